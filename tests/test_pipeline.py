"""The text-to-image cascade and editing end to end, on tiny random models.

Base: 4x4 tokens of an f=4 tokenizer (16 px); super-res: 8x8 tokens of another f=4
tokenizer (32 px). The text encoder is the tiny T5 of the text fixtures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import runs
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer
from muse_jax.models.vqgan import VQGAN
from muse_jax.pipeline import MusePipeline, SamplerOptions
from muse_jax.stages import MuseStage
from muse_jax.text import TextEncoder
from muse_jax.trainers.vqgan import Tokenizer

K = 32


def tiny_tokenizer(seed):
  model = VQGAN(
    channels=(8, 8, 16),
    num_res_blocks=1,
    mid_num_res_blocks=1,
    latent_channels=8,
    codebook_size=K,
    norm_groups=4,
  )
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))["params"]
  return Tokenizer(model, params)


def tiny_stage(model, text_encoder, seed):
  stage = MuseStage(model, text_length=8, text_dim=text_encoder.embed_dim)
  params = jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(seed), x.shape, x.dtype) * 0.5,
    jax.tree.map(
      lambda b: b.unbox(apply_constraint=False) if hasattr(b, "unbox") else b,
      stage.abstract_params(),
      is_leaf=lambda b: hasattr(b, "unbox"),
    ),
  )
  return stage, params


@pytest.fixture(scope="module")
def text_encoder(fixtures_dir):
  return TextEncoder.from_pretrained(fixtures_dir / "text" / "t5_v1_1", max_length=8)


@pytest.fixture(scope="module")
def pipe(text_encoder):
  small = dict(width=32, num_layers=1, num_heads=2, mlp_dim=64, scan_layers=False)
  base = MaskedTransformer(vocab_size=K, grid=(4, 4), **small)
  sr = SuperResTransformer(
    vocab_size=K,
    grid=(8, 8),
    low_vocab_size=K,
    low_grid=(4, 4),
    num_low_layers=1,
    attention="full",
    **small,
  )
  return MusePipeline(
    tokenizer=tiny_tokenizer(0),
    text_encoder=text_encoder,
    base=tiny_stage(base, text_encoder, 1),
    superres=tiny_stage(sr, text_encoder, 2),
    superres_tokenizer=tiny_tokenizer(3),
    base_options=SamplerOptions(num_steps=3),
    superres_options=SamplerOptions(num_steps=2),
  )


def test_generate_shapes_ranges_and_determinism(pipe):
  assert pipe.base_resolution == 16 and pipe.resolution == 32
  images = pipe.generate(["a red circle", "two blue squares"], seed=3, num_images_per_prompt=2)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  again = pipe.generate(["a red circle", "two blue squares"], seed=3, num_images_per_prompt=2)
  np.testing.assert_array_equal(images, again)
  base_ids, hr_ids = pipe.generate_tokens(["a red circle"], seed=3, negative_prompts="blue")
  assert base_ids.shape == (1, 16) and hr_ids.shape == (1, 64)
  assert base_ids.min() >= 0 and base_ids.max() < K and hr_ids.max() < K
  other, _ = pipe.generate_tokens(["a red circle"], seed=4, negative_prompts="blue")
  assert (other != base_ids).any()


def test_negative_prompt_changes_the_guided_result(pipe):
  a, _ = pipe.generate_tokens(["a red circle"] * 2, seed=0, guidance_scale=8.0)
  b, _ = pipe.generate_tokens(
    ["a red circle"] * 2, ["a green triangle"] * 2, seed=0, guidance_scale=8.0
  )
  assert (a != b).any()


def test_inpainting_keeps_known_tokens_at_both_scales(pipe):
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32), bool)
  mask[8:24, 16:] = True
  base_ids, hr_ids, known_low, known_hr = pipe.inpaint_tokens(
    image, mask, "a red circle", num_images=2, seed=1
  )
  low_ref = pipe._encode_image(pipe.tokenizer, image, 16).reshape(-1)  # the 16 px version's tokens
  hr_ref = np.asarray(pipe.superres_tokenizer.encode(image[None])).reshape(-1)
  assert known_low.sum() == 16 - 4 and known_hr.sum() == 64 - 16
  np.testing.assert_array_equal(
    hr_ids[:, known_hr], np.broadcast_to(hr_ref[known_hr], (2, known_hr.sum()))
  )
  np.testing.assert_array_equal(
    base_ids[:, known_low], np.broadcast_to(low_ref[known_low], (2, known_low.sum()))
  )
  assert (base_ids[:, ~known_low] != pipe.base_stage.mask_id).all()
  out = pipe.inpaint(image, mask, "a red circle", seed=1)
  assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8


def test_outpaint_and_edit_give_images(pipe):
  image = np.full((32, 32, 3), 200, np.uint8)
  out = pipe.outpaint(image, "a red circle", directions=["right", "down"], size=8)
  assert out.shape == (1, 32, 32, 3)
  edited = pipe.edit(image, "a blue square", num_iterations=3, num_images=2)
  assert edited.shape == (2, 32, 32, 3) and edited.dtype == np.uint8


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda p: p.generate([]), "non-empty list of strings"),
    (lambda p: p.generate("a red circle"), "non-empty list of strings"),
    (lambda p: p.generate(["a", "b"], ["x", "y", "z"]), "3 negative prompts for 2 prompts"),
    (lambda p: p.generate(["a"], nonsense=1), "unknown sampler options \\['nonsense'\\]"),
    (
      lambda p: p.inpaint(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16)), "a"),
      "shape \\(32, 32, 3\\)",
    ),
    (lambda p: p.inpaint(np.zeros((32, 32, 3), np.float32), np.zeros((32, 32)), "a"), "uint8 RGB"),
    (
      lambda p: p.inpaint(np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16)), "a"),
      "mask must have shape",
    ),
    (
      lambda p: p.outpaint(np.zeros((32, 32, 3), np.uint8), "a", directions="sideways"),
      "directions",
    ),
  ],
)
def test_bad_input_is_named(pipe, call, message):
  with pytest.raises((ValueError, TypeError), match=message):
    call(pipe)


def test_run_layout_errors_name_the_missing_part(tmp_path):
  with pytest.raises(FileNotFoundError, match="no run folder"):
    runs.read_layout(tmp_path / "nope")
  runs.write_layout(tmp_path, tokenizer="vq", text_encoder="t5", base="base")
  (tmp_path / "vq").mkdir()
  (tmp_path / "t5").mkdir()
  with pytest.raises(FileNotFoundError, match="the base part is missing"):
    runs.read_layout(tmp_path)
  runs.write_layout(tmp_path, tokenizer="vq", text_encoder="t5", base="vq", superres="vq")
  with pytest.raises(ValueError, match="needs both 'superres' and 'superres_tokenizer'"):
    runs.read_layout(tmp_path)
