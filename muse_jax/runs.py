"""A run folder: where a pipeline's parts live, and loading them into a ``MusePipeline``.

A run is a folder with a ``pipeline.json`` naming each part's folder (relative to the
run, or absolute) and the default sampler settings::

    {
      "tokenizer": "tokenizer",            # `muse-jax train-vq` workdir or diffusers VQModel
      "text_encoder": "/models/t5-xxl",    # Hugging Face T5 / CLIP folder
      "text_max_length": 128,              # optional
      "base": "base", "base_kind": "muse", # `muse-jax train` workdir
      "superres": "superres",              # optional, with "superres_tokenizer"
      "superres_tokenizer": "tokenizer_512",
      "base_sampler": {"num_steps": 24, "guidance_scale": 4.0},
      "superres_sampler": {"num_steps": 8}
    }

Without ``pipeline.json`` the parts are looked up under those default folder names.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp

from muse_jax import amused, cpu_features, partitioning, stages
from muse_jax.models.vq_convs import fast_convs
from muse_jax.pipeline import PAPER_BASE, PAPER_SUPERRES, MusePipeline, SamplerOptions
from muse_jax.text import TextEncoder
from muse_jax.vq_tokenizer import load_tokenizer

PIPELINE_FILE = "pipeline.json"
PART_KEYS = ("tokenizer", "text_encoder", "base", "superres", "superres_tokenizer")
OPTIONAL_PARTS = ("superres", "superres_tokenizer")

# base_kind / superres_kind -> loader(path, mesh=...) -> (stage, params).
STAGE_LOADERS: dict[str, Callable[..., tuple[stages.Stage, Any]]] = {
  "muse": stages.load_muse_stage,
  "amused": amused.load_amused_stage,
}


def read_layout(run: str | os.PathLike) -> dict[str, Any]:
  """The run's ``pipeline.json`` with part paths resolved (defaults when absent)."""
  run = pathlib.Path(run)
  if not run.is_dir():
    raise FileNotFoundError(f"no run folder at {run}")
  spec_file = run / PIPELINE_FILE
  if spec_file.is_file():
    try:
      layout = json.loads(spec_file.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{spec_file}: not valid JSON ({e})") from None
  else:
    layout = {k: k for k in PART_KEYS if k not in OPTIONAL_PARTS or (run / k).exists()}
  for key in PART_KEYS:
    if layout.get(key):
      layout[key] = run / layout[key]  # an absolute path stays absolute
  missing = [k for k in PART_KEYS if k not in OPTIONAL_PARTS and not layout.get(k)]
  if missing:
    raise ValueError(f"{run}: the pipeline names no {missing}")
  if bool(layout.get("superres")) != bool(layout.get("superres_tokenizer")):
    raise ValueError(f"{run}: a super-res stage needs both 'superres' and 'superres_tokenizer'")
  for key in PART_KEYS:
    path = layout.get(key)
    if path and not pathlib.Path(path).exists():
      raise FileNotFoundError(f"{run}: the {key} part is missing (no {path})")
  return layout


def write_layout(run: str | os.PathLike, **layout: Any) -> pathlib.Path:
  """Writes ``pipeline.json`` (paths as given: relative ones are relative to the run)."""
  run = pathlib.Path(run)
  run.mkdir(parents=True, exist_ok=True)
  clean = {
    k: (os.fspath(v) if isinstance(v, os.PathLike) else v)
    for k, v in layout.items()
    if v is not None
  }
  path = run / PIPELINE_FILE
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(clean, indent=2, sort_keys=True))
  os.replace(tmp, path)
  return path


def _options(defaults: SamplerOptions, overrides: dict[str, Any] | None) -> SamplerOptions:
  overrides = dict(overrides or {})
  if isinstance(overrides.get("choice_temperature"), list):
    overrides["choice_temperature"] = tuple(overrides["choice_temperature"])
  unknown = set(overrides) - {f.name for f in dataclasses.fields(SamplerOptions)}
  if unknown:
    raise ValueError(f"unknown sampler settings {sorted(unknown)} in {PIPELINE_FILE}")
  return dataclasses.replace(defaults, **overrides)


def load_pipeline(
  run: str | os.PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
  text_dtype: Any = jnp.float32,
) -> MusePipeline:
  """Loads every part a run names into a ready ``MusePipeline``.

  Args:
    run: the run folder.
    mesh: devices to place parameters on and split batches over (default: all).
    text_dtype: computation dtype of the text encoder.

  Raises:
    FileNotFoundError / ValueError: naming the run and the missing or bad part.
  """
  layout = read_layout(run)
  mesh = mesh or partitioning.make_mesh()

  def stage(key: str):
    kind = layout.get(f"{key}_kind", "muse")
    if kind not in STAGE_LOADERS:
      raise ValueError(
        f"{run}: {key}_kind {kind!r} is unknown; expected one of {sorted(STAGE_LOADERS)}"
      )
    return STAGE_LOADERS[kind](layout[key], mesh=mesh)

  text_encoder = TextEncoder.from_pretrained(
    layout["text_encoder"],
    max_length=layout.get("text_max_length"),
    hidden_layer=layout.get("text_hidden_layer"),
    dtype=text_dtype,
    mesh=mesh,
  )
  base = stage("base")
  superres = stage("superres") if layout.get("superres") else None
  device = mesh.devices.flat[0]
  if base[0].dtype == jnp.bfloat16 and cpu_features.converts_bf16(device):
    logging.warning(
      "%s computes in bfloat16, but this CPU has no bfloat16 units (AVX512-BF16, AMX or Arm's"
      " BF16): it converts every operand, so float32 runs faster here (aMUSEd at mid size on"
      " 2 Zen 3 cores: 14.2 s an image in bfloat16, 10.6 s in float32; `muse-jax convert"
      " amused --dtype float32`)",
      run,
    )
  # The tokenizers' products in the base's compute dtype (in float32 on such a CPU), by the
  # device's faster convs.
  convs = fast_convs(base[0].dtype, device)
  return MusePipeline(
    tokenizer=load_tokenizer(layout["tokenizer"]).with_convs(**convs),
    text_encoder=text_encoder,
    base=base,
    superres=superres,
    superres_tokenizer=(
      load_tokenizer(layout["superres_tokenizer"]).with_convs(**convs) if superres else None
    ),
    base_options=_options(PAPER_BASE, layout.get("base_sampler")),
    superres_options=_options(PAPER_SUPERRES, layout.get("superres_sampler")),
    mesh=mesh,
  )
