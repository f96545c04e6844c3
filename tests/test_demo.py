"""The demo end to end on a reduced budget (`tiny`), its reuse of stages, and its variants."""

import json
import pathlib

import flax
import numpy as np
from PIL import Image
import pytest

from configs import demo as demo_config
from muse_jax import demo
from muse_jax.demo import build, refill
from muse_jax.vq_tokenizer import load_tokenizer


@pytest.mark.slow
def test_tiny_demo_trains_generates_judges_and_reuses(tmp_path, monkeypatch, capsys):
  config = demo_config.get_config("tiny")
  # A workdir relative to the working directory, as a user types it.
  monkeypatch.chdir(tmp_path.parent)
  workdir = pathlib.Path(tmp_path.name)
  report = demo.run(config, workdir)
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk["totals"] == report["totals"]
  # Every prompt form, seen and held-out pairs, each image judged and written.
  assert set(report["totals"]) == {"single", "count", "relation"}
  for form in report["totals"].values():
    assert form["seen"]["total"] > 0 and form["held_out"]["total"] > 0
  assert len(report["images"]) == 18 + 2 * (1 + len(config.held_out))
  by_shape = report["single_seen_by_shape"]
  assert set(by_shape) == {"circle", "square", "triangle"}
  for key in ("correct", "total"):
    assert sum(t[key] for t in by_shape.values()) == report["totals"]["single"]["seen"][key]
  squares = 6 - sum(p.endswith("square") for p in config.held_out)
  assert by_shape["square"]["total"] == squares * config.images_per_prompt
  for entry in report["images"]:
    assert (tmp_path / entry["image"]).is_file()
    assert isinstance(entry["correct"], bool) and (entry["correct"] or entry["reason"])
  assert (tmp_path / report["inpainting"]["image"]).is_file()
  assert Image.open(tmp_path / "samples.png").size[0] > 8 * 64
  for stage in ("text_encoder", "tokenizer", "decoder", "data", "base"):
    assert (tmp_path / f"{stage}.done").is_file()
  # Pixels come from the decoder finetuned on the base's guesses, not the tokenizer's own.
  assert json.loads((tmp_path / "pipeline.json").read_text())["tokenizer"] == "decoder"
  text = demo.summary(report, tmp_path)
  assert "single" in text and "held-out" in text and "by shape: circle" in text

  # A second run trains nothing and gives the same images (same seed, same checkpoints).
  capsys.readouterr()
  again = demo.run(config, workdir)
  assert set(again["timings_s"]) == {"generate + judge"}
  assert f"[demo] base: reusing {workdir / 'base'}" in capsys.readouterr().out
  assert [e["correct"] for e in again["images"]] == [e["correct"] for e in report["images"]]

  # A reused stage's changed settings are named, not dropped in silence; the sampler's only
  # change what is generated.
  changed = config.copy_and_resolve_references()
  changed.shape_weights.square, changed.base.lr, changed.sampler.num_steps = 5.0, 1e-3, 2
  demo.run(changed, workdir)
  out = capsys.readouterr().out
  assert out.count("trained with other settings") == 2, out
  assert "tokenizer.done to train it again): shape_weights.square: 3.0 -> 5.0\n" in out
  assert f"base.done to train it again): base.lr: {config.base.lr} -> 0.001\n" in out

  _check_refilled_batches(config, tmp_path)


def _check_refilled_batches(config, workdir):
  """The decoder's training grids: real tokens, with exactly the masked share re-predicted."""
  source = build.shapes_source(config)

  def batches(min_rate, max_rate):
    options = config.decoder.copy_and_resolve_references()
    options.update(pool=8, rounds=1, min_rate=min_rate, max_rate=max_rate)
    return refill.RefilledBatches(source, workdir / build.TOKENIZER, workdir / build.TEXT,
                                  config.text.max_length, workdir / build.BASE, options, 4, 0)  # fmt: skip

  pictures = np.stack([source[i]["image"] for i in range(8)])
  real = np.asarray(load_tokenizer(workdir / build.TOKENIZER).encode(pictures))
  kept = batches(0.0, 0.0)
  np.testing.assert_array_equal(kept.fills[:, 0], real)
  np.testing.assert_array_equal(kept.images, pictures)
  batch = next(batches(1.0, 1.0))
  assert batch["image"].shape == (4, 64, 64, 3) and batch["ids"].shape == (4, 8, 8)
  assert batch["ids"].dtype == np.int32
  assert 0 <= batch["ids"].min() and batch["ids"].max() < config.tokenizer.codebook_size
  with pytest.raises(ValueError, match=r"refill rates \[0.9, 0.1\]"):
    batches(0.9, 0.1)


def test_long_variant_only_trains_the_base_longer():
  """`configs/demo.py:long` is the 10-minute demo with its base trained longer, nothing else."""
  default, long = (
    flax.traverse_util.flatten_dict(demo_config.get_config(arg).to_dict(), sep=".")
    for arg in (None, "long")
  )
  changed = {k for k in default if default[k] != long[k]}
  assert changed == {"base.steps", "base.time_limit_s"}
  assert long["base.steps"] > default["base.steps"]
  assert long["base.time_limit_s"] > default["base.time_limit_s"]


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="unknown variant 'huge'; expected '', 'tiny' or 'long'"):
    demo_config.get_config("huge")
