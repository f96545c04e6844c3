"""TextEncoder end to end: tokenization identical to transformers, embeddings, bad input, CLI."""

import json
import logging
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import text_encoders
from muse_jax import text_shards
from muse_jax.convert.hf_text import module_from_config
from muse_jax.partitioning import make_mesh
from muse_jax.text import TextEncoder, concatenate, resolve_folders
from muse_jax.tokenizer import Tokenizer

TOL = dict(atol=1e-4, rtol=1e-4)


def _copy(src: pathlib.Path, dst: pathlib.Path, names: list[str]) -> pathlib.Path:
  dst.mkdir(parents=True, exist_ok=True)
  for name in names:
    shutil.copy(src / name, dst / name)
  return dst


# (folder, family, golden, files kept: None = the folder as is) -> each tokenizer route.
TOKENIZER_CASES = {
  "t5 tokenizer.json": ("t5", "t5", "t5", None),
  "t5 spiece.model": ("t5", "t5", "t5", ["spiece.model", "tokenizer_config.json"]),
  "t5 v1.1 spiece.model": ("t5_v1_1", "t5", "t5_v1_1", None),
  "clip tokenizer.json": ("clip", "clip", "clip", None),
  "clip vocab+merges": (
    "clip",
    "clip",
    "clip",
    ["vocab.json", "merges.txt", "tokenizer_config.json"],
  ),
  "pipeline vocab+merges, pad '!'": ("pipeline/tokenizer", "clip", "pipeline", None),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_token_ids_identical_to_transformers(case, fixtures_dir, tmp_path):
  folder, family, golden_name, keep = TOKENIZER_CASES[case]
  folder = fixtures_dir / "text" / folder
  if keep is not None:
    folder = _copy(folder, tmp_path, keep)
  golden = np.load(fixtures_dir / "text" / f"golden_{golden_name}.npz")
  tokenizer = Tokenizer.from_folder(folder, family)
  batch = tokenizer(list(golden["prompts"]), golden["input_ids"].shape[1])
  np.testing.assert_array_equal(batch.ids, golden["input_ids"])
  np.testing.assert_array_equal(batch.mask, golden["attention_mask"])
  # Prompts are cut by exactly what did not fit.
  length = golden["input_ids"].shape[1]
  full = tokenizer(list(golden["prompts"]), 1024).mask.sum(1)
  np.testing.assert_array_equal(batch.dropped, np.maximum(full - length, 0))
  assert batch.dropped.max() > 100
  assert tokenizer(["x"], 64).mask.sum() == tokenizer(["x"], 3).mask.sum()  # no cut, no pad effect.


@pytest.fixture(scope="module")
def encoders(fixtures_dir):
  """One TextEncoder per fixture; T5 v1.1 sharded over a (data, fsdp, tensor) = 2x2x2 mesh."""
  text = fixtures_dir / "text"
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  return {
    "t5_v1_1": TextEncoder.from_pretrained(text / "t5_v1_1", mesh=mesh),
    "t5": TextEncoder.from_pretrained(text / "t5"),
    "clip": TextEncoder.from_pretrained(text / "clip"),
    "pipeline": TextEncoder.from_pretrained(text / "pipeline"),  # the pipeline root.
  }


@pytest.mark.parametrize("name", ["t5_v1_1", "t5", "clip", "pipeline"])
def test_encode_matches_transformers(name, encoders, fixtures_dir, caplog):
  encoder = encoders[name]
  golden = np.load(fixtures_dir / "text" / f"golden_{name}.npz")
  with caplog.at_level(logging.WARNING):
    out = encoder.encode(list(golden["prompts"]))
  assert re.search(r"truncated \d of 10 prompts to \d+ tokens", caplog.text)
  np.testing.assert_array_equal(out.mask, golden["attention_mask"])
  if encoder.family == "t5":
    np.testing.assert_allclose(out.embeddings, golden["last_hidden_state"], **TOL)
    assert out.pooled is None and encoder.pooled_dim is None
  else:
    np.testing.assert_allclose(out.embeddings, golden["penultimate_hidden_state"], **TOL)
    np.testing.assert_allclose(out.pooled, golden["pooled"], **TOL)
    assert out.pooled.shape == (10, encoder.pooled_dim)
  assert out.embeddings.shape == (10, encoder.max_length, encoder.embed_dim)


def test_sharded_parameters_and_outputs(encoders):
  encoder = encoders["t5_v1_1"]
  wi = encoder.params["blocks"]["mlp"]["wi_0"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  out = encoder.encode(["a photo of a cat"] * 8)
  assert out.embeddings.sharding.spec[0] == ("data", "fsdp")


def test_batches_are_independent_and_buckets_do_not_leak(encoders):
  encoder = encoders["clip"]
  prompts = ["a photo of a cat", "", "café crème 🐶", "x", "a red cube", "東京"]
  full = encoder.encode(prompts)
  for subset in ([2], [0, 3, 5]):  # a single prompt; three (padded to a bucket of 4).
    part = encoder.encode([prompts[i] for i in subset])
    assert part.embeddings.shape[0] == len(subset)
    np.testing.assert_allclose(part.embeddings, full.embeddings[np.array(subset)], atol=1e-5)
    np.testing.assert_allclose(part.pooled, full.pooled[np.array(subset)], atol=1e-5)
  assert np.isfinite(np.asarray(full.embeddings)).all()


def test_unconditional_is_the_empty_prompt(encoders):
  for encoder in (encoders["t5"], encoders["clip"]):
    empty = encoder.encode([""])
    uncond = encoder.unconditional(3)
    assert uncond.embeddings.shape == (3, encoder.max_length, encoder.embed_dim)
    for field in ("embeddings", "mask", "pooled"):
      if getattr(empty, field) is not None:
        np.testing.assert_array_equal(
          getattr(uncond, field), np.repeat(getattr(empty, field), 3, axis=0)
        )
    both = concatenate([encoder.encode(["a cat"]), uncond])  # guidance: [cond; uncond].
    assert both.batch_size == 4


def test_bfloat16_and_final_layer(fixtures_dir):
  golden = np.load(fixtures_dir / "text" / "golden_clip.npz")
  encoder = TextEncoder.from_pretrained(
    fixtures_dir / "text" / "clip", dtype=jnp.bfloat16, hidden_layer="final"
  )
  out = encoder.encode(list(golden["prompts"][:4]))
  assert out.embeddings.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
  ref = golden["last_hidden_state"][:4]
  assert np.abs(np.asarray(out.embeddings, np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_bad_arguments(encoders, fixtures_dir):
  encoder = encoders["t5"]
  with pytest.raises(ValueError, match="at least one prompt"):
    encoder.encode([])
  with pytest.raises(TypeError, match="not one string"):
    encoder.encode("a cat")
  with pytest.raises(TypeError, match="must be strings"):
    encoder.encode(["a cat", None])
  with pytest.raises(ValueError, match="T5 gives only its final-norm"):
    TextEncoder.from_pretrained(fixtures_dir / "text" / "t5", hidden_layer=-2)
  with pytest.raises(
    ValueError,
    match=r"hidden_layer=5; expected 'final' or an index into the 4 hidden states \(-4..3\)",
  ):
    TextEncoder.from_pretrained(fixtures_dir / "text" / "clip", hidden_layer=5)
  with pytest.raises(ValueError, match="max_length=100 exceeds the 77 positions"):
    TextEncoder.from_pretrained(fixtures_dir / "text" / "clip", max_length=100)


def test_folder_resolution_and_missing_tokenizer(fixtures_dir, tmp_path):
  text = fixtures_dir / "text"
  pipeline = text / "pipeline"
  assert resolve_folders(pipeline) == (pipeline / "text_encoder", pipeline / "tokenizer")
  assert resolve_folders(pipeline / "text_encoder") == (
    pipeline / "text_encoder",
    pipeline / "tokenizer",
  )
  assert resolve_folders(text / "t5") == (text / "t5", text / "t5")
  bare = _copy(text / "t5_v1_1", tmp_path / "bare", ["config.json", "model.safetensors"])
  with pytest.raises(
    FileNotFoundError, match=r"bare: no tokenizer found; expected one of .*spiece.model"
  ):
    TextEncoder.from_pretrained(bare)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TextEncoder.from_pretrained(tmp_path / "nowhere")


def test_encode_captions_writes_resumable_shards(encoders, tmp_path):
  encoder = encoders["clip"]
  captions = ["a photo of a cat", "", "café 🐶", "x", "a red cube", "東京", "two dogs"]
  path = tmp_path / "captions.jsonl"
  path.write_text("".join(f'{{"caption": "{c}"}}\n' for c in captions) + "\n", encoding="utf-8")
  out = tmp_path / "encoded"
  index = text_shards.encode_captions(encoder, path, out, batch_size=2, shard_size=3)
  assert [s["count"] for s in index["shards"]] == [3, 3, 1]
  # Lose the last shard as an interrupted run would; the rerun writes only that one.
  (out / index["shards"][-1]["file"]).unlink()
  first = (out / index["shards"][0]["file"]).stat().st_mtime_ns
  index = text_shards.encode_captions(encoder, path, out, batch_size=2, shard_size=3)
  assert (
    len(index["shards"]) == 3 and (out / index["shards"][0]["file"]).stat().st_mtime_ns == first
  )

  encoded = text_shards.EncodedCaptions(out)
  reference = encoder.encode(captions)
  assert len(encoded) == len(captions)
  for i in (0, 1, 4, 6):
    row = encoded[i]
    assert row["embeddings"].dtype == jnp.bfloat16 and row["mask"].dtype == bool
    np.testing.assert_array_equal(row["mask"], reference.mask[i])
    np.testing.assert_allclose(
      row["embeddings"].astype(np.float32), reference.embeddings[i], atol=0.02, rtol=0.02
    )
    np.testing.assert_allclose(
      row["pooled"].astype(np.float32), reference.pooled[i], atol=0.02, rtol=0.02
    )
  with pytest.raises(ValueError, match="other settings"):
    text_shards.encode_captions(encoder, path, out, batch_size=2, shard_size=4)


def test_cli_reports_a_missing_folder_in_one_line(tmp_path):
  captions = tmp_path / "c.txt"
  captions.write_text("a cat\n")
  args = [
    "--text-encoder",
    str(tmp_path / "missing"),
    "--captions",
    str(captions),
    "--out",
    str(tmp_path / "o"),
  ]
  result = subprocess.run(
    [sys.executable, "-c", "from muse_jax.main import run; run()", "encode-text", *args],
    capture_output=True,
    text=True,
    env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    check=False,
  )
  assert result.returncode != 0
  assert (
    f"muse-jax encode-text: text encoder folder {tmp_path / 'missing'} does not exist"
    in result.stderr
  )
  assert "Traceback" not in result.stderr


def test_configs_describe_the_fixtures_and_every_size(fixtures_dir):
  for variant in ("tiny_t5", "tiny_clip"):
    config = text_encoders.get_config(variant)
    folder = pathlib.Path(config.path)
    saved = json.loads((folder / "config.json").read_text())
    for key, value in config.hf_config.items():
      if key != "architectures":
        assert saved[key] == value, (variant, key)
  for variant in ("t5_v1_1_xxl", "flan_t5_base", "t5_11b", "clip_l14", "clip_bigg14"):
    config = text_encoders.get_config(variant)
    module = module_from_config(config.hf_config.to_dict())
    assert module.embed_dim == config.embed_dim
  with pytest.raises(ValueError, match="unknown variant 't5_xxxl'"):
    text_encoders.get_config("t5_xxxl")
