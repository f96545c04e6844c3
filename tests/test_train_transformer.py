"""The transformer trainer: sharded == single device, kill + resume == uninterrupted,
a tiny model overfits a fixed batch, a NaN stops the run and keeps the last good state.
"""

import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import checkpointing, losses, masking
from muse_jax.trainers import common, token_batches
from muse_jax.trainers import transformer as trainer

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
STEPS = 6


def load_config(name: str, arg: str | None = "tiny"):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**mesh):
  c = load_config("muse_base_632m")
  # Two micro-batches per step: accumulation is part of what must match across meshes.
  c.train.update(steps=STEPS, batch_size=8, grad_accum=2, ckpt_every=2, log_every=2, keep=5)
  c.mesh.update(mesh)
  return c


def final_params(workdir):
  with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
    step = ckpt.latest_step()
    tree = ckpt.saved_tree(step)
    got = ckpt.restore_or_none({"params": tree["params"]}, partial=True)
  return got.step, got.state["params"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  """STEPS steps on a (fsdp=2, tensor=4) mesh of the 8 fake devices."""
  workdir = tmp_path_factory.mktemp("sharded")
  trainer.train_and_evaluate(tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4}), workdir)
  return workdir


def test_sharded_equals_single_device(sharded_run, tmp_path):
  single = tmp_path / "single"
  state = trainer.train_and_evaluate(
    tiny_config(shape={"data": 1, "fsdp": 1, "tensor": 1}, num_devices=1), single
  )
  assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == 1
  step_a, a = final_params(sharded_run)
  step_b, b = final_params(single)
  assert step_a == step_b == STEPS
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5), a, b)
  # And training moved the parameters: the comparison is not of two initialisations.
  with checkpointing.Checkpointer(single / "checkpoints") as ckpt:
    first = ckpt.restore_or_none({"params": ckpt.saved_tree(2)["params"]}, step=2, partial=True)
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), first.state["params"], b)
  assert max(jax.tree.leaves(moved)) > 1e-3


class _Killed(Exception):
  pass


def _dies_at_step_5(make_batches):
  """``make_batches`` whose data kills the job when it fetches the batch of step 5."""

  def dying(*args, **kwargs):
    data = make_batches(*args, **kwargs)
    real_next = data.__next__

    class Dying(type(data)):
      def __next__(self):
        if self.index == 4:  # Fetching the batch of step 5: the job is killed.
          raise _Killed()
        return real_next()

    data.__class__ = Dying
    return data

  return dying


def test_kill_and_resume_equals_uninterrupted(sharded_run, tmp_path, monkeypatch):
  config = tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4})
  make_batches = token_batches.make_batches
  monkeypatch.setattr(token_batches, "make_batches", _dies_at_step_5(make_batches))
  with pytest.raises(_Killed):
    trainer.train_and_evaluate(config, tmp_path)
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() == 4
  monkeypatch.setattr(token_batches, "make_batches", make_batches)
  trainer.train_and_evaluate(config, tmp_path)  # resumes at 4, runs 5 and 6
  _, resumed = final_params(tmp_path)
  _, uninterrupted = final_params(sharded_run)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), resumed, uninterrupted
  )


def test_muon_trains_sharded_and_resumes(tmp_path, monkeypatch):
  """Muon's state (momentum for the matrices, AdamW moments for the rest) is sharded,
  checkpointed and restored like AdamW's: killed after step 4 and resumed, the run ends
  where an uninterrupted one does, and the matrices moved."""

  def config():
    c = tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4})
    c.optim.update(name="muon", lr=1e-2, warmup_steps=1)
    return c

  whole = tmp_path / "whole"
  trainer.train_and_evaluate(config(), whole)
  make_batches = token_batches.make_batches
  monkeypatch.setattr(token_batches, "make_batches", _dies_at_step_5(make_batches))
  with pytest.raises(_Killed):
    trainer.train_and_evaluate(config(), tmp_path / "resumed")
  monkeypatch.setattr(token_batches, "make_batches", make_batches)
  trainer.train_and_evaluate(config(), tmp_path / "resumed")
  (_, a), (_, b) = final_params(whole), final_params(tmp_path / "resumed")
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  with checkpointing.Checkpointer(whole / "checkpoints") as ckpt:
    first = ckpt.restore_or_none({"params": ckpt.saved_tree(2)["params"]}, step=2, partial=True)
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), first.state["params"], a)
  moved = flax.traverse_util.flatten_dict(moved, sep="/")
  assert min(v for k, v in moved.items() if k.endswith("wi/kernel")) > 1e-4


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(shape={"data": 1, "fsdp": 2, "tensor": 4})
  make_batches = token_batches.make_batches

  def poisoned(*args, **kwargs):
    data = make_batches(*args, **kwargs)
    real_next = data.__next__

    class Poisoned(type(data)):
      def __next__(self):
        batch = real_next()
        if self.index == 3:  # The batch of step 3 carries a NaN.
          batch["text_emb"] = np.full_like(batch["text_emb"], np.nan)
        return batch

    data.__class__ = Poisoned
    return data

  monkeypatch.setattr(token_batches, "make_batches", poisoned)
  with pytest.raises(FloatingPointError, match=r"last good checkpoint is step 2"):
    trainer.train_and_evaluate(config, tmp_path)
  step, params = final_params(tmp_path)
  assert step == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_superres_overfits_a_fixed_batch(tmp_path):
  c = load_config("muse_superres_512")
  c.train.update(steps=40, batch_size=8, ckpt_every=40, log_every=40, cond_drop_prob=0.0)
  c.data.update(fixed_batch=True)
  c.optim.update(lr=1e-2, warmup_steps=5)
  model = trainer.make_model(c.model)
  batch = next(token_batches.make_batches(c, local_batch=8, superres=True))
  mask = masking.arccos_mask(jax.random.key(7), 8, model.length)

  @jax.jit
  def masked_loss(params):
    inputs = jnp.where(mask, model.mask_id, batch["ids"])
    logits = model.apply(
      {"params": params}, inputs, batch["text_emb"], batch["text_mask"], batch["low_res_ids"]
    )
    return losses.masked_cross_entropy(logits, batch["ids"], mask)

  first = jax.tree.map(np.asarray, trainer.init_state(c, model, *_tx_and_shardings(c)).params)
  loss_before, _ = masked_loss(first)
  state = trainer.train_and_evaluate(c, tmp_path)
  loss_after, accuracy = masked_loss(jax.tree.map(np.asarray, state.params))
  assert float(loss_before) > 3.0  # about ln(64) at init
  assert float(loss_after) < 0.3 * float(loss_before), (float(loss_before), float(loss_after))
  assert float(accuracy) > 0.6


def _tx_and_shardings(c):
  from muse_jax import optim

  tx, _ = optim.make_optimizer(c.optim, c.train.steps)
  mesh, rules = trainer.mesh_and_rules(c)
  with jax.set_mesh(mesh):
    _, shardings = trainer.state_shardings(c, tx, mesh, rules)
  return tx, shardings


def _random_vq_workdir(path):
  """A tiny VQGAN (K = 64, f16: 64 px <-> 4x4 ids) in the VQ trainer's checkpoint layout."""
  from muse_jax.trainers import vqgan_config

  vq_config = load_config("vqgan_f16_256")
  model = vqgan_config.make_model(vq_config.model)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  with checkpointing.Checkpointer(path / "checkpoints") as ckpt:
    ckpt.write_config(vq_config)
    ckpt.save(1, {"ema_params": trainer.nn.meta.unbox(params)}, force=True)
  return path


def test_trains_resumes_and_samples_on_pre_encoded_shards(tmp_path, monkeypatch):
  """Shards written by `preencode` (fake tokenizer and text encoder, shapes images);
  sample grids decoded by a (random) VQGAN."""
  from muse_jax.data import preencode, shapes, sources

  shapes.write_folder(tmp_path / "images", 12, shapes.ShapesSource(size=32, seed=1), progress=False)
  data_config = token_batches_data_config(tmp_path / "images")
  source = sources.make_source(data_config, process_index=0, process_count=1)

  def tokenize(images):  # ids = mean red level of each 8x8 block / 4: [B, 4, 4] in [0, 64)
    blocks = images[..., 0].reshape(len(images), 4, 8, 4, 8).mean(axis=(2, 4))
    return (blocks // 4).astype(np.int32)

  def encode_text(captions):  # one row per word: (length, position); T = 6, Dt = 4
    emb, mask = np.zeros((len(captions), 6, 4), np.float32), np.zeros((len(captions), 6), bool)
    for i, caption in enumerate(captions):
      for j, word in enumerate(caption.split()[:6]):
        emb[i, j, :2], mask[i, j] = (len(word), j), True
    return emb, mask

  shards = tmp_path / "shards"
  preencode.preencode(
    source,
    shards,
    tokenizers=[preencode.ImageTokenizer("32", 32, tokenize)],
    encode_text=encode_text,
    batch_size=4,
    examples_per_shard=6,
    num_threads=1,
    progress=False,
  )
  c = load_config("muse_base_632m")
  c.model.update(vocab_size=64, grid=(4, 4))
  c.text.update(length=6, dim=4)
  # Read in the training loop's thread (the demo's way), and resumed from the saved state.
  c.data.update(source="pre_encoded", path=str(shards), ids_key="ids_32", num_threads=0)
  c.train.update(steps=2, batch_size=4, ckpt_every=1, log_every=1)
  c.optim.schedule = "constant"  # Independent of train.steps: the resumed run reuses the compile.
  c.mesh.shape = {"data": 1, "fsdp": 2, "tensor": 4}
  c.sample.update(every=2, num=2, steps=3, vq_checkpoint=str(_random_vq_workdir(tmp_path / "vq")))
  images = []
  monkeypatch.setattr(
    common.MetricWriter, "images", lambda self, step, values: images.append(values)
  )
  uncond_emb, uncond_mask = token_batches.unconditional_text(c)
  assert uncond_emb.shape == (6, 4) and not uncond_mask.any()  # the empty caption, from uncond.npz
  trainer.train_and_evaluate(c, tmp_path / "run")
  (grid,) = images[0].values()
  assert grid.shape == (2 * 64, 2 * 64, 3) and grid.dtype == np.uint8  # truth row, sample row
  c.train.steps = 3
  trainer.train_and_evaluate(c, tmp_path / "run")  # resumes at 2
  with checkpointing.Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
    assert ckpt.latest_step() == 3
    tree = ckpt.saved_tree()
    got = ckpt.restore_or_none({"step": tree["step"]}, partial=True)
  (state,) = got.extras["data"]
  assert state["examples"] == 12  # 3 steps x 4 examples, continued across the restart


def token_batches_data_config(folder):
  from muse_jax.data import pipeline

  c = pipeline.default_data_config()
  c.update(source="folder", resolution=32)
  c.folder.path = str(folder)
  return c


@pytest.mark.parametrize(
  "env, wanted",
  [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # one-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),  # pod slice
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "16"}, True),
  ],
)
def test_distributed_start_only_when_the_environment_asks(monkeypatch, env, wanted):
  for key in (
    "TPU_WORKER_HOSTNAMES",
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
  ):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert common._wants_distributed() is wanted
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  common.maybe_initialize_distributed("auto")
  common.maybe_initialize_distributed("off")
  assert len(calls) == int(wanted)
  with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
    common.maybe_initialize_distributed("yes")


def test_synthetic_task_is_deterministic_and_conditional():
  c = load_config("muse_superres_512")
  a = token_batches.make_batches(c, local_batch=4, superres=True)
  first, second = next(a), next(a)
  b = token_batches.make_batches(c, local_batch=4, superres=True)
  b.set_state({"index": 1})
  jax.tree.map(np.testing.assert_array_equal, next(b), second)  # resumable by index
  assert not np.array_equal(first["ids"], second["ids"])
  assert first["ids"].shape == (4, 64) and first["low_res_ids"].shape == (4, 16)
  assert (
    first["ids"].max() < c.model.vocab_size and first["low_res_ids"].max() < c.model.low_vocab_size
  )
  # Each low-res code expands into one fixed 2x2 patch of high-res codes (before noise).
  for low, high in zip(a.low_maps, a.maps, strict=True):
    low = low.reshape(4, 4)
    patches = high.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3)  # [4, 4, 2, 2]
    for code in np.unique(low):
      same = patches[low == code]
      assert (same == same[0]).all()
