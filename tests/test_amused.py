"""aMUSEd in the pipeline: the stage, the sampler preset, conversion, and parity with diffusers.

The fixtures come from tests/fixtures/make_golden_amused.py: small random U-ViTs, and a
whole tiny aMUSEd folder (``amused/pipeline``: transformer, VQ, CLIP with projection,
tokenizer, scheduler) with one diffusers ``AmusedPipeline`` generation whose random
draws were recorded, so that ours can replay it token for token.
"""

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import amused, editing, masking, runs, sampling
from muse_jax.convert.amused import ConversionError, convert_amused
from muse_jax.convert.diffusers_uvit import load_uvit
from muse_jax.models import uvit
from muse_jax.stage_decode import decode_stage
from muse_jax.text import TextEmbeddings

AMUSED = pathlib.Path(__file__).parent / "fixtures" / "amused"
SRC = AMUSED / "pipeline"


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(AMUSED / "pipeline_reference.npz"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  dst = tmp_path_factory.mktemp("amused") / "run"
  assert not convert_amused(SRC, dst).up_to_date
  return dst


@pytest.fixture(scope="module")
def pipe(run_dir):
  return runs.load_pipeline(run_dir)


def _guided(stage, params, text, negative, ids, t):
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), text, negative)
  return sampling.guided_logits(lambda x: stage.logits(params, x, both), ids, t)


# ---------------------------------------------------------------------------
# The stage and the preset.


@pytest.mark.parametrize("name, row", [("uvit_256", 0), ("uvit_512", 1)])
def test_stage_logits_equal_the_uvit_on_the_golden_inputs(name, row):
  """ids [B, L] <-> grid (8x6 for the 512 variant: not square), micro-conditions, text."""
  model, params = load_uvit(AMUSED / name)
  ref = dict(np.load(AMUSED / name / "reference.npz"))
  b, h, w = ref["ids"].shape
  stage = amused.AmusedStage(
    model, grid=(h, w), mask_id=model.vocab_size - 1, micro_conds=tuple(ref["micro_conds"][row])
  )
  text = TextEmbeddings(
    ref["encoder_hidden_states"], np.ones(ref["encoder_hidden_states"].shape[:2], bool),
    ref["pooled_text_emb"],
  )  # fmt: skip
  logits = jax.jit(stage.logits)(params, ref["ids"].reshape(b, h * w), text)
  assert logits.shape == (b, h * w, model.codebook_size)
  np.testing.assert_allclose(
    np.asarray(logits)[row].reshape(h, w, -1), ref["logits"][row], atol=1e-4, rtol=0
  )
  if name == "uvit_512":  # bfloat16 products, float32 sums and logits: close, not equal
    fast_logits = jax.jit(stage.with_dtype(jnp.bfloat16).logits)
    fast = fast_logits(params, ref["ids"].reshape(b, -1), text)
    err = np.abs(np.asarray(fast) - np.asarray(logits)).max()
    assert fast.dtype == jnp.float32 and 0 < err < 0.05 * np.abs(ref["logits"]).max(), err
    # Kernels cast once beforehand: the same products, so the same logits.
    cast = uvit.cast_kernels(params, jnp.bfloat16)
    np.testing.assert_array_equal(fast_logits(cast, ref["ids"].reshape(b, -1), text), fast)
    dtypes = {
      jax.tree_util.keystr(k): a.dtype for k, a in jax.tree_util.tree_leaves_with_path(cast)
    }
    narrowed = {k for k, d in dtypes.items() if d == jnp.bfloat16}
    assert narrowed and all(k.endswith(("['kernel']", "['depthwise']")) for k in narrowed)
    assert dtypes["['embedding']"] == jnp.float32 and len(narrowed) < len(dtypes)
    widened = uvit.cast_kernels(cast, jnp.float32)  # bfloat16 storage is never widened
    assert jax.tree.all(jax.tree.map(lambda a, c: a.dtype == c.dtype, widened, cast))


def test_stage_checks_its_description():
  model, _ = load_uvit(AMUSED / "uvit_512")
  with pytest.raises(ValueError, match=r"mask_id 5 must be an input id outside the codebook"):
    amused.AmusedStage(model, grid=(8, 6), mask_id=5)
  with pytest.raises(ValueError, match="needs an even token grid; got"):
    amused.AmusedStage(model, grid=(7, 6), mask_id=39)
  with pytest.raises(ValueError, match="micro_conds has 3 values; the model takes 5"):
    amused.AmusedStage(model, grid=(8, 6), mask_id=39, micro_conds=(1, 2, 3))
  stage = amused.AmusedStage(model, grid=(8, 6), mask_id=39)
  assert stage.with_dtype("bfloat16").model.dtype == jnp.bfloat16
  # The einsum attention on this CPU (cuDNN's only on recent NVIDIA GPUs).
  assert stage.with_dtype("bfloat16").model.attention_implementation is None
  assert hash(stage) == hash(amused.AmusedStage(model, grid=[8, 6], mask_id=39))  # static arg
  other = stage.with_micro_conditioning(crop=(16, 8), aesthetic_score=5.5)
  assert other.micro_conds == (256.0, 256.0, 16.0, 8.0, 5.5)
  no_pool = TextEmbeddings(np.zeros((1, 3, 24), np.float32), np.ones((1, 3), bool))
  with pytest.raises(ValueError, match="needs the pooled text embedding"):
    stage.logits(None, np.zeros((1, 48), np.int32), no_pool)


def test_the_preset_is_diffusers_amused_pipeline():
  p = amused.AMUSED_SAMPLER
  assert (p.num_steps, p.schedule, p.temperature, p.top_k) == (12, "cosine", 1.0, None)
  assert p.choice_temperature == (2.0, 0.0)  # AmusedScheduler.set_timesteps(temperature=(2, 0))
  assert (p.guidance_scale, p.guidance_schedule) == (9.0, "constant")
  assert amused.guidance_from_diffusers(10.0) == p.guidance_scale
  assert amused.guidance_from_diffusers(1.0) is None  # diffusers guides only when g > 1
  assert amused.AMUSED_INPAINT_SAMPLER.schedule == "linear"
  # (orig width, orig height, crop top, crop left, aesthetic score), as the pipelines order them.
  assert amused.micro_conditioning(512, 384, crop=(16, 8)) == (512.0, 384.0, 16.0, 8.0, 6.0)


# ---------------------------------------------------------------------------
# A converted aMUSEd folder, against diffusers' AmusedPipeline.


def test_converted_run_carries_the_preset_and_the_micro_conditioning(pipe, golden):
  assert pipe.base_options == amused.AMUSED_SAMPLER
  assert isinstance(pipe.base_stage, amused.AmusedStage)
  assert pipe.resolution == 16 and pipe.base_stage.grid == (4, 4)
  assert pipe.base_stage.micro_conds == tuple(golden["micro_conds"])  # output size, (0, 0), 6


def test_text_conditioning_matches_diffusers(pipe, golden):
  """CLIP penultimate hidden states and pooled projection, as AmusedPipeline computes them."""
  prompts = [str(p) for p in golden["prompts"]]
  text = pipe.text_encoder.encode(prompts + [""] * len(prompts))
  np.testing.assert_allclose(text.embeddings, golden["hidden_states"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(text.pooled, golden["text_embeds"], atol=1e-5, rtol=0)


def test_generation_replays_diffusers_token_for_token(pipe, golden):
  """Fed diffusers' recorded draws, stage + guidance + schedule + confidence temperatures
  give AmusedPipeline's ids after every one of the 12 steps, and its image."""
  stage, params, opts = pipe.base_stage, pipe.base_params, pipe.base_options
  prompts = [str(p) for p in golden["prompts"]]
  text, negative = pipe.encode_prompts(prompts, None, guided=True)
  n, (b, length) = opts.num_steps, golden["sample_uniform"].shape[1:]
  taus = sampling._choice_temperatures(opts.choice_temperature, n)

  @jax.jit
  def step(ids, i, uniform, gumbel):
    logits = _guided(stage, params, text, negative, ids, opts.guidance_scale)
    unknown = jnp.sum(ids == stage.mask_id, axis=-1)
    keep = sampling.num_masked_after(i, n, jnp.full((b,), length), unknown, opts.schedule)
    return logits, sampling.unmask_step(
      ids, logits, mask_id=stage.mask_id, num_to_mask=keep, uniform=uniform, gumbel=gumbel,
      temperature=opts.temperature, choice_temperature=taus[i],
    )  # fmt: skip

  cu = golden["confidence_uniform"]
  gumbels = -np.log(np.maximum(-np.log(np.maximum(cu, 1e-20)), 1e-20))
  gumbels = np.concatenate([gumbels, np.zeros_like(gumbels[:1])])  # the last step draws none
  ids = jnp.full((b, length), stage.mask_id, jnp.int32)
  for i in range(n):
    logits, ids = step(ids, jnp.int32(i), golden["sample_uniform"][i], gumbels[i])
    if i == 0:
      np.testing.assert_allclose(
        np.asarray(logits).reshape(golden["first_logits"].shape), golden["first_logits"],
        atol=2e-4 * np.abs(golden["first_logits"]).max(), rtol=0,
      )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(ids), golden["history"][i].reshape(b, length), f"{i}")
  image = pipe.tokenizer.decode(np.asarray(ids).reshape(b, *stage.grid))
  assert np.abs(image.astype(int) - golden["image"]).max() <= 1


def test_generate_is_an_image_of_the_right_size_and_seeded(pipe):
  prompts = ["a red cube on a table", "two dogs"]
  images = pipe.generate(prompts, seed=0)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert images.std() > 5  # not a flat image
  np.testing.assert_array_equal(images, pipe.generate(prompts, seed=0))
  assert (pipe.generate(prompts, seed=1) != images).any()


def test_img2img_keeps_more_of_the_image_at_low_strength(pipe, golden):
  image = golden["image"][1]  # diffusers' generation
  ids = np.asarray(pipe.tokenizer.encode(image[None])).reshape(-1)
  low, _ = pipe.img2img_tokens(image, "a red cube", strength=0.25, num_images=4, seed=3)
  high, _ = pipe.img2img_tokens(image, "a red cube", strength=1.0, num_images=4, seed=3)
  # strength 0.25 of 12 steps: continue from step 9, where ⌊16·cos(3π/8)⌋ = 6 of 16 are masked.
  masked = int(np.floor(16 * masking.ratio_table("cosine", 12)[9]))
  assert masked == 6
  kept_low, kept_high = (low == ids).sum(-1), (high == ids).sum(-1)
  assert (kept_low >= 16 - masked).all()  # unmasked tokens are never changed
  assert kept_low.mean() > kept_high.mean() + 3
  with pytest.raises(ValueError, match=r"runs int\(12 \* 0.05\) = 0 of the 12 decoding steps"):
    pipe.img2img(image, "a red cube", strength=0.05)


def test_inpaint_mask_is_the_one_amused_inpaint_pipeline_makes(pipe, golden):
  snapped = amused.amused_inpaint_mask(golden["inpaint_mask"], 4)
  np.testing.assert_array_equal(editing.token_mask(snapped, 4), golden["inpaint_tokens"])
  # Our inpaint masks every token the mask touches: the 1/4-covered one too.
  touched = editing.token_mask(editing.check_mask(golden["inpaint_mask"], 16), 4)
  assert touched.sum() == golden["inpaint_tokens"].sum() + 1
  image = golden["image"][0]
  base, _, known, _ = pipe.inpaint_tokens(image, snapped, "a red cube", seed=0)
  np.testing.assert_array_equal(known, ~golden["inpaint_tokens"].reshape(-1))
  ids = np.asarray(pipe.tokenizer.encode(image[None])).reshape(-1)
  np.testing.assert_array_equal(base[0, known], ids[known])


# ---------------------------------------------------------------------------
# Conversion: idempotent, atomic, clear errors; diffusers folders load directly too.


def test_conversion_is_idempotent_and_refuses_foreign_folders(
  run_dir, tmp_path, monkeypatch, caplog
):
  before = (run_dir / runs.PIPELINE_FILE).stat().st_mtime_ns
  assert convert_amused(SRC, run_dir).up_to_date
  assert (run_dir / runs.PIPELINE_FILE).stat().st_mtime_ns == before
  assert not list(run_dir.parent.glob(".run.*"))  # no temporary left behind
  # Other options replace an older conversion (renamed into place).
  other = tmp_path / "bf16"
  convert_amused(SRC, other)
  assert not convert_amused(SRC, other, dtype="bfloat16").up_to_date
  stage, params = amused.load_amused_stage(other / "transformer")
  assert stage.model.dtype == jnp.bfloat16 and not list(tmp_path.glob(".bf16.*"))
  assert params["mlm_conv2"]["kernel"].dtype == jnp.bfloat16  # cast once, at load
  assert params["embedding"].dtype == jnp.float32
  _, params = amused.load_amused_stage(other / "transformer", dtype="float32")
  assert params["mlm_conv2"]["kernel"].dtype == jnp.float32  # as stored
  # Loaded on a CPU without bfloat16 units, a bfloat16 run says it is slower there.
  for units in (True, False):
    monkeypatch.setattr(runs.cpu_features, "has_bf16_products", lambda u=units: u)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      runs.load_pipeline(other)
    assert ("this CPU has no bfloat16 units" in caplog.text) is not units
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(ConversionError, match="exists and is not an aMUSEd conversion"):
    convert_amused(SRC, tmp_path / "mine")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_missing_and_inconsistent_parts_are_named(tmp_path):
  src = tmp_path / "amused"
  shutil.copytree(SRC, src)
  shutil.rmtree(src / "vqvae")
  (src / "scheduler" / "scheduler_config.json").unlink()
  with pytest.raises(
    ConversionError, match=r"missing vqvae/config\.json, scheduler/scheduler_config\.json"
  ):
    convert_amused(src, tmp_path / "out")
  shutil.copytree(SRC / "vqvae", src / "vqvae")
  shutil.copytree(SRC / "scheduler", src / "scheduler", dirs_exist_ok=True)
  cfg = json.loads((src / "vqvae" / "config.json").read_text())
  (src / "vqvae" / "config.json").write_text(json.dumps(cfg | {"num_vq_embeddings": 64}))
  with pytest.raises(
    ConversionError, match="num_vq_embeddings is 64 but transformer codebook_size is 32"
  ):
    convert_amused(src, tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_a_diffusers_folder_loads_as_a_stage_without_conversion(pipe):
  stage, params = amused.load_amused_stage(SRC / "transformer")
  assert stage == pipe.base_stage
  jax.tree.map(np.testing.assert_array_equal, params, pipe.base_params)


def _computations(hlo: str) -> tuple[dict[str, str], set[str]]:
  """An HLO module's computations by name, and the names of those that run inside some
  while loop (its bodies and everything they call)."""
  texts = {}
  for text in re.split(r"\n(?=(?:ENTRY )?%)", hlo):
    name = re.match(r"(?:ENTRY )?%([\w.\-]+)", text)
    if name:
      texts[name.group(1)] = text
  calls = {
    name: set(re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", text))
    for name, text in texts.items()
  }
  inside = set(re.findall(r"body=%([\w.\-]+)", hlo))
  todo = list(inside)
  while todo:
    for callee in calls.get(todo.pop(), ()):
      if callee not in inside:
        inside.add(callee)
        todo.append(callee)
  return texts, inside


@pytest.mark.parametrize("scan_layers", [False, True])
def test_text_only_work_is_hoisted_out_of_the_decode_loop(pipe, scan_layers):
  """Cross-attention keys/values and AdaLN modulations depend on the text alone: with the
  layers unrolled (as loaded), XLA computes them once per call, not once per step."""
  stage = pipe.base_stage
  assert not stage.model.scan_layers
  params = pipe.base_params
  if scan_layers:  # the control: inside nn.scan's loop they cannot be hoisted
    stage = dataclasses.replace(stage, model=stage.model.clone(scan_layers=True))
    params = load_uvit(SRC / "transformer", scan_layers=True)[1]
  text, negative = pipe.encode_prompts(["a cat"], None, guided=True)
  ids = jnp.full((1, math.prod(stage.grid)), stage.mask_id, jnp.int32)
  hlo = (
    decode_stage.lower(stage, params, ids, text, negative, None, jax.random.key(0),
                       jnp.float32(1.0), jnp.float32(3.0), num_steps=4, schedule="cosine",
                       choice_temperature=(2.0, 0.0), top_k=None, guidance_schedule="constant")
    .compile().as_text()
  )  # fmt: skip
  texts, in_loops = _computations(hlo)
  # The products themselves (layout copies of their results may stay in the loop).
  text_only = re.compile(r' dot\(.*op_name="[^"]*/(?:attn2/kv|modulation)/dot_general"')
  placed = collections.Counter(name in in_loops for name, t in texts.items() if text_only.search(t))
  assert placed[False] > 0  # the test sees them at all
  if scan_layers:
    assert placed[True] > 0
  else:
    assert placed[True] == 0, f"{placed[True]} text-only products left in the decode loop"


def muse_jax(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "muse_jax.main", *args]
  return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_cli_converts_and_reports_errors_in_one_line(tmp_path):
  result = muse_jax("convert", "amused", f"--src={SRC}", f"--dst={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr
  assert "converted" in result.stdout and (tmp_path / "run" / runs.PIPELINE_FILE).is_file()
  result = muse_jax("convert", "amused", f"--src={tmp_path}", f"--dst={tmp_path / 'x'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "is not a complete aMUSEd folder: missing transformer/config.json" in result.stderr
  result = muse_jax("convert", "maskgit", f"--src={SRC}", f"--dst={tmp_path / 'x'}")
  assert result.returncode != 0 and "one of ['amused']" in result.stderr
