"""VQGAN trainer: end to end on shapes, resume, NaN guard, decoder finetuning, tokenizer
loading, the reconstruct command, perceptual-loss switch."""

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest
import safetensors.numpy

from muse_jax import checkpointing, vq_tokenizer
from muse_jax.eval.reconstruction import reconstruct_folder
from muse_jax.models.perceptual import LPIPS_TAPS, VGG16_CONVS
from muse_jax.trainers import vqgan, vqgan_config


def tiny_config(**train):
  c = vqgan_config.base_config()
  c.model.update(
    channels=(8, 16, 16), num_res_blocks=1, latent_channels=8, codebook_size=32, norm_groups=4
  )
  c.disc.update(channels=(8, 16), stem_channels=8)
  c.data.update(source="shapes", resolution=32, num_threads=2, prefetch_buffer_size=8)
  c.loss.update(perceptual_weight=0.0, disc_start=2, r1_every=2)
  c.codebook.update(init="kmeans", restart_every=2)
  c.train.update(steps=4, batch_size=8, log_every=2, image_every=4, eval_every=4, eval_batch=4, ckpt_every=2,
                 keep=2, async_checkpoints=False)  # fmt: skip
  c.train.update(**train)
  c.optim.update(lr=1e-3, warmup_steps=2)
  c.disc_optim.update(lr=1e-3, warmup_steps=2)
  return c


def _lpips_file(path):
  rng = np.random.default_rng(0)
  t, cin = {}, 3
  for idx, width in VGG16_CONVS:
    t[f"features.{idx}.weight"] = (rng.normal(size=(width, cin, 3, 3)) / np.sqrt(9 * cin)).astype(
      np.float32
    )
    t[f"features.{idx}.bias"] = np.zeros(width, np.float32)
    cin = width
  for k, idx in enumerate(LPIPS_TAPS):
    t[f"lin{k}.model.1.weight"] = np.full((1, dict(VGG16_CONVS)[idx], 1, 1), 0.1, np.float32)
  safetensors.numpy.save_file(t, str(path))
  return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """4 steps (2 plain, 2 with the GAN terms and LPIPS), then resumed to 6."""
  root = tmp_path_factory.mktemp("vq")
  c = tiny_config()
  c.loss.update(
    perceptual_weight=0.05, perceptual_weights=str(_lpips_file(root / "lpips.safetensors"))
  )
  state = vqgan.train_and_evaluate(c, root / "run")
  assert int(state.step) == 4
  c.train.steps = 6
  state = vqgan.train_and_evaluate(c, root / "run")
  return root / "run", c, state


@pytest.mark.slow
def test_train_resume_and_outputs(trained):
  workdir, _, state = trained
  assert int(state.step) == 6
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False)
  assert ckpt.all_steps() == [4, 6]
  restored = ckpt.restore_or_none(ckpt.saved_tree(), partial=False)
  ckpt.close()
  data = restored.extras["data"][0]
  assert data["examples"] == 6 * 8  # the resumed run continued the stream
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "checkpoints" / "config.json").is_file()
  for x in jax.tree.leaves(state.params):
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.slow
def test_load_tokenizer_from_workdir(trained):
  workdir, c, state = trained
  tok = vq_tokenizer.load_tokenizer(workdir)
  np.testing.assert_allclose(
    tok.params["quantize"]["embedding"], state.ema_params["quantize"]["embedding"]
  )
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  ids = tok.encode(images)
  assert ids.shape == (2, 8, 8) and ids.dtype == jnp.int32
  out = tok.decode(ids)
  assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
  raw = vq_tokenizer.load_tokenizer(workdir / "checkpoints", use_ema=False)
  np.testing.assert_allclose(
    raw.params["quantize"]["embedding"], state.params["quantize"]["embedding"]
  )
  with pytest.raises(
    ValueError, match=r"codebook_size mismatch: the caller expects 8192 but .*config.json has 32"
  ):
    vq_tokenizer.load_tokenizer(workdir, expect={"codebook_size": 8192})


@pytest.mark.slow
@pytest.mark.parametrize("code_noise, optimizer", [(0.0, "adamw"), (0.5, "adamw"), (0.0, "muon")])
def test_decoder_finetune_freezes_encoder_and_codebook(trained, tmp_path, code_noise, optimizer):
  src, _, _ = trained
  source = vq_tokenizer.load_tokenizer(src)
  c = tiny_config(steps=2)
  c.optim.name = optimizer  # Muon's matrices (the decoder's convs) come from the axis names
  c.model.update(decoder_channels=(16, 32, 32), decoder_num_res_blocks=2)
  c.finetune.update(checkpoint=str(src), code_noise=code_noise, noise_neighbours=3)
  c.loss.disc_start = 100
  state = vqgan.train_and_evaluate(c, tmp_path / "ft")
  for key in ("encoder", "quantize"):
    for a, b in zip(
      jax.tree.leaves(state.params[key]), jax.tree.leaves(source.params[key]), strict=True
    ):
      np.testing.assert_array_equal(a, b)
  assert state.params["decoder"]["conv_in"]["kernel"].shape[-1] == 32
  # Finite and not collapsed to zero (a NaN fails the comparison).
  assert float(jnp.abs(state.params["decoder"]["conv_out"]["kernel"]).max()) > 0


def _finetune_step_metrics(config, model, params, batch, code_neighbours=None):
  """The metrics of one decoder-finetuning step from ``params``."""
  from muse_jax.trainers import vqgan_step

  step = vqgan_step.make_train_step(
    config, model, None, None, optax.identity(), optax.identity(), lambda s: 0.0,
    use_gan=False, frozen_encoder=True, code_neighbours=code_neighbours,
  )  # fmt: skip
  state = vqgan_step.TrainState(jnp.int32(0), params, params, optax.identity().init(params),
                                None, None, None, jnp.zeros(model.codebook_size))  # fmt: skip
  return jax.jit(step)(state, batch, None)[1]


def _finetune_step_rec_loss(config, model, params, batch, code_neighbours=None):
  """The reconstruction loss of one decoder-finetuning step from ``params``."""
  return float(
    _finetune_step_metrics(config, model, params, batch, code_neighbours)["train/rec_loss"]
  )


def _decoded_l1(model, params, ids, x):
  return float(jnp.mean(jnp.abs(x - model.apply({"params": params}, ids, method=model.decode))))


def test_code_noise_reaches_the_decoder(trained):
  """One finetuning step's loss is the clean image against the decoded *perturbed* codes."""
  from muse_jax.models import quantizer

  src, _, _ = trained
  model, params = vq_tokenizer.load_tokenizer(src)
  c = tiny_config()
  c.finetune.update(checkpoint=str(src), code_noise=0.5)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), jnp.uint8)
  x = images.astype(jnp.float32) / 127.5 - 1.0
  ids = model.apply({"params": params}, x, method=model.encode)
  codebook = model.apply({"params": params}, method=lambda m: m.quantize.codebook())
  neighbours = quantizer.nearest_codes(codebook, 3)

  # The step's draw: the base key (train.seed) folded with step 0, then with 1.
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(c.train.seed), 0), 1)
  noisy = quantizer.perturb_ids(rng, ids, neighbours, 0.5)
  assert int(jnp.sum(noisy != ids)) > 0
  for ids_seen, code_neighbours in ((ids, None), (noisy, neighbours)):
    np.testing.assert_allclose(
      _finetune_step_rec_loss(c, model, params, {"image": images}, code_neighbours),
      _decoded_l1(model, params, ids_seen, x),
      rtol=1e-5,
    )


def test_batch_ids_replace_the_encoders_when_finetuning(trained, tmp_path):
  src, _, _ = trained
  model, params = vq_tokenizer.load_tokenizer(src)
  c = tiny_config()
  c.finetune.update(checkpoint=str(src))
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
  x = images.astype(jnp.float32) / 127.5 - 1.0
  given = jax.random.randint(jax.random.key(2), (8, 8, 8), 0, model.codebook_size)
  metrics = _finetune_step_metrics(c, model, params, {"image": images, "ids": given})
  np.testing.assert_allclose(
    float(metrics["train/rec_loss"]), _decoded_l1(model, params, given, x), rtol=1e-5
  )
  # The encoder is not run: the code metrics are the given ids', not the encoder's.
  from muse_jax.models import quantizer

  expected = quantizer.code_stats(given, model.codebook_size)
  encoded = quantizer.code_stats(
    model.apply({"params": params}, x, method=model.encode), model.codebook_size
  )
  assert float(expected["perplexity"]) != pytest.approx(float(encoded["perplexity"]))
  np.testing.assert_allclose(metrics["codebook/perplexity"], expected["perplexity"], rtol=1e-6)
  np.testing.assert_allclose(metrics["codebook/batch_usage"], expected["codebook_usage"])
  assert float(metrics["train/quantizer_loss"]) == 0.0

  # Through the trainer: the right shape trains; a wrong one, or ids without finetuning,
  # is an error naming the shape found and the one expected.
  def batches(ids_shape):
    while True:
      yield {"image": np.asarray(images), "ids": np.zeros(ids_shape, np.int32)}

  c.train.update(steps=1, batch_size=8, eval_every=0, image_every=0)
  vqgan.train_and_evaluate(c, tmp_path / "ok", data=batches((8, 8, 8)))
  with pytest.raises(ValueError, match=r"ids of shape \(8, 4, 4\) .*expected int \[8, 8, 8\]"):
    vqgan.train_and_evaluate(c, tmp_path / "shape", data=batches((8, 4, 4)))
  c.finetune.checkpoint = ""
  with pytest.raises(ValueError, match="without finetune.checkpoint"):
    vqgan.train_and_evaluate(c, tmp_path / "plain", data=batches((8, 8, 8)))


@pytest.mark.parametrize(
  ("finetune", "match"),
  [
    (dict(code_noise=1.0), r"code_noise is 1.0; expected a probability in \[0, 1\)"),
    (dict(code_noise=0.2, checkpoint=""), "code_noise=0.2 needs finetune.checkpoint"),
    (dict(code_noise=0.2, noise_neighbours=32), "noise_neighbours is 32; expected 1 <= k < codebook_size 32"),
  ],
)  # fmt: skip
def test_bad_code_noise_names_the_value(trained, tmp_path, finetune, match):
  c = tiny_config(steps=1)
  c.finetune.update(checkpoint=str(trained[0]))
  c.finetune.update(**finetune)
  with pytest.raises(ValueError, match=match):
    vqgan.train_and_evaluate(c, tmp_path / "bad")


def test_finetune_from_a_mismatched_tokenizer_names_both(fixtures_dir, tmp_path):
  """aMUSEd-layout config whose codebook (32) differs from the diffusers folder's (64)."""
  src = fixtures_dir / "vq" / "amused_tiny"
  c = tiny_config(steps=1)
  c.model.update(
    channels=(32, 64), decoder_num_res_blocks=2, downsample="conv", use_quant_conv=True, embed_dim=8,
    norm_groups=8, codebook_size=32, mid_attention=False, input_range=(0.0, 1.0),
  )  # fmt: skip
  c.finetune.checkpoint = str(src)
  with pytest.raises(
    ValueError,
    match=r"does not match the config's quantize \(codebook_size 32 vs 64\).*\(32, 8\) vs checkpoint \(64, 8\)",
  ):
    vqgan.train_and_evaluate(c, tmp_path / "bad")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  c = tiny_config(steps=2, log_every=1)
  c.loss.disc_start = 100
  vqgan.train_and_evaluate(c, tmp_path)
  c.train.steps = 4
  c.loss.reconstruction_weight = float("nan")
  with pytest.raises(
    FloatingPointError, match=r"at or before step 3.*last good checkpoint is step 2"
  ):
    vqgan.train_and_evaluate(c, tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints", async_save=False)
  assert ckpt.all_steps() == [2]
  ckpt.close()


def test_bad_image_batches_name_found_and_expected(tmp_path):
  c = tiny_config(steps=1)
  c.codebook.init = "random"

  class Floats:
    def __next__(self):
      return {"image": np.zeros((8, 32, 32, 3), np.float32)}

  with pytest.raises(
    ValueError, match=r"shape \(8, 32, 32, 3\) and dtype float32; expected uint8 \[b, 32, 32, 3\]"
  ):
    vqgan.train_and_evaluate(c, tmp_path, data=Floats())


def test_missing_perceptual_weights_warn_once(caplog):
  c = tiny_config()
  c.loss.update(perceptual_weight=0.05, perceptual_weights="/nowhere/lpips.safetensors")
  with caplog.at_level(logging.WARNING):
    net, params = vqgan.load_perceptual(c)
  assert net is None and params is None
  msgs = [r.getMessage() for r in caplog.records if "Perceptual loss is OFF" in r.getMessage()]
  assert len(msgs) == 1 and "/nowhere/lpips.safetensors" in msgs[0]


def test_reconstruct_with_the_diffusers_fixture(fixtures_dir, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / f"{i}.png")
  r = reconstruct_folder(
    str(fixtures_dir / "vq" / "amused_tiny"), str(src), str(tmp_path / "out"), size=32
  )
  assert r["files"] == 3 and np.isfinite(r["psnr"]) and 0 < r["codebook_usage"] <= 1
  assert sorted(p.name for p in pathlib.Path(tmp_path / "out").iterdir()) == [
    "0.png",
    "1.png",
    "2.png",
  ]
  with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling factor 2"):
    reconstruct_folder(
      str(fixtures_dir / "vq" / "amused_tiny"), str(src), str(tmp_path / "o2"), size=33
    )
  with pytest.raises(FileNotFoundError, match="no folder of images at .*missing"):
    reconstruct_folder(
      str(fixtures_dir / "vq" / "amused_tiny"), str(tmp_path / "missing"), str(tmp_path / "o3")
    )
