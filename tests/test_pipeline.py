"""The text-to-image cascade and editing end to end, on tiny random models.

The run is written to disk in the trainers' formats (see run_factory) and loaded with
`runs.load_pipeline`, so the loaders are part of what is tested.
"""

import subprocess
import sys

import numpy as np
import pytest
from run_factory import K, make_run

from muse_jax import runs


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return runs.load_pipeline(make_run(tmp_path_factory.mktemp("run")))


def test_sampling_loads_none_of_the_training_input_stack():
  """A user who samples (a Colab with aMUSEd weights, say) needs no grain, TFDS or torch."""
  heavy = ("grain", "array_record", "tensorflow_datasets", "tensorflow", "torch")
  code = (
    "import sys, muse_jax.main, muse_jax.runs, muse_jax.convert.amused; "
    f"print([m for m in {heavy!r} if m in sys.modules])"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


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
