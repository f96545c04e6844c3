"""The demo: Muse trained and judged end to end on the synthetic shapes set, on any machine.

`run(config, workdir)` builds a frozen text encoder, trains a VQ tokenizer and a base
transformer with the library's own trainers (then the tokenizer's decoder again, on the
base's guesses at real images' tokens), holding out some (colour, shape) pairs. It
writes a run folder that `muse-jax sample --checkpoint WORKDIR` uses, generates images
for prompts of every caption form plus an inpainting example, and judges each image from
its pixels. Outputs: WORKDIR/samples.png, WORKDIR/report.json, WORKDIR/samples/.

Each stage leaves a `<stage>.done` marker when it finishes, with the settings it was
trained with; a second run reuses the finished stages and only generates, and names the
settings of a reused stage that its config changes (remove the stage's marker to train it
again with them).
"""

from __future__ import annotations

from collections.abc import Callable
import json
import pathlib
import time

import ml_collections

from muse_jax import runs
from muse_jax.demo import build, evaluate

STAGES: tuple[tuple[str, Callable[[ml_collections.ConfigDict, pathlib.Path], None]], ...] = (
  (build.TEXT, lambda c, w: build.make_text_encoder(c, w / build.TEXT)),
  (build.TOKENIZER, lambda c, w: build.train_tokenizer(c, w / build.TOKENIZER)),
  (build.DATA, build.encode_training_set),
  (build.BASE, build.train_base),
  (build.DECODER, build.finetune_decoder),
)
# The config's top-level entries that each stage is trained by, besides the outputs of the
# stages before it. The rest (sampler, prompts) only change what is generated.
STAGE_SETTINGS = {
  build.TEXT: ("seed", "text"),
  build.TOKENIZER: ("image_size", "held_out", "forms", "shape_weights", "tokenizer"),
  build.DATA: ("preencode",),
  build.BASE: ("base",),
  build.DECODER: ("decoder",),
}


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
  """{'a': {'b': 1}} -> {'a.b': 1}, values as JSON reads them back (tuples as lists)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _flat(value, f"{prefix}{key}.")
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return out


def stage_settings(config: ml_collections.ConfigDict, name: str) -> dict[str, object]:
  """The settings that stage `name` is trained by, flattened ('tokenizer.steps': 2700)."""
  tree = config.to_dict()
  return _flat({k: tree[k] for k in STAGE_SETTINGS[name] if k in tree})


def changed_settings(marker: pathlib.Path, settings: dict[str, object]) -> list[str]:
  """'key: trained value -> new value' for each setting the config changes since `marker`."""
  trained = json.loads(marker.read_text()).get("settings")
  if trained is None:  # a marker from before they were recorded
    return []
  keys = sorted(set(trained) | set(settings))
  return [
    f"{k}: {trained.get(k)} -> {settings.get(k)}" for k in keys if trained.get(k) != settings.get(k)
  ]


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains what is not trained yet, then generates and judges; returns the report."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  timings = {}
  for name, stage in STAGES:
    marker = workdir / f"{name}.done"
    settings = stage_settings(config, name)
    if marker.exists():
      print(f"[demo] {name}: reusing {workdir / name}", flush=True)
      if changed := changed_settings(marker, settings):
        print(
          f"[demo] {name} was trained with other settings than this run's "
          f"(remove {marker} to train it again): {'; '.join(changed)}",
          flush=True,
        )
      continue
    print(f"[demo] {name} ...", flush=True)
    start = time.monotonic()
    stage(config, workdir)
    timings[name] = round(time.monotonic() - start, 1)
    marker.write_text(json.dumps({"seconds": timings[name], "settings": settings}))
  build.write_pipeline(config, workdir)

  print("[demo] generating and judging ...", flush=True)
  start = time.monotonic()
  pipeline = runs.load_pipeline(workdir)
  report = evaluate.evaluate(pipeline, config, workdir)
  timings["generate + judge"] = round(time.monotonic() - start, 1)
  report["timings_s"] = timings
  report["held_out_pairs"] = list(config.held_out)
  report["config"] = config.to_dict()
  tmp = workdir / "report.json.tmp"
  tmp.write_text(json.dumps(report, indent=2, default=str))
  tmp.replace(workdir / "report.json")
  return report


def summary(report: dict, workdir: pathlib.Path) -> str:
  """One screen: accuracy per caption form, seen vs held-out pairs; timings; files."""

  def cell(t: dict) -> str:
    return f"{t['correct']:>3}/{t['total']:<3} {t['accuracy']:6.1%}" if t["total"] else f"{'-':>14}"

  lines = [
    "muse-jax demo: images judged against their prompts from their pixels",
    f"{'form':<10} {'seen pairs':>16} {'held-out pairs':>16}",
  ]
  for form in ("single", "count", "relation"):
    if form in report["totals"]:
      t = report["totals"][form]
      lines.append(f"{form:<10} {cell(t['seen']):>16} {cell(t['held_out']):>16}")
  if by_shape := report.get("single_seen_by_shape"):
    lines.append(
      "single, seen pairs, by shape: "
      + ", ".join(f"{shape} {t['correct']}/{t['total']}" for shape, t in by_shape.items())
    )
  inpaint = report["inpainting"]
  lines.append(
    f"inpainting '{inpaint['prompt']}': {'correct' if inpaint['correct'] else 'wrong: ' + inpaint['reason']}"
  )
  lines.append(f"held-out pairs: {', '.join(report['held_out_pairs'])}")
  lines.append("time (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))
  lines.append(f"wrote {workdir / 'samples.png'}, {workdir / 'report.json'}")
  lines.append(
    f"sample it yourself: muse-jax sample --checkpoint {workdir} --prompt 'a red circle' --out red.png"
  )
  return "\n".join(lines)
