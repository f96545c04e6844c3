"""A published aMUSEd folder -> a run folder that ``runs.load_pipeline`` loads, without torch.

aMUSEd (amused-256, amused-512) is published as a diffusers pipeline folder::

    transformer/   UVit2DModel: config.json + diffusion_pytorch_model[.fp16].safetensors
    vqvae/         VQModel (f = 16, 8192 codes)
    text_encoder/  CLIPTextModelWithProjection (CLIP-L/14)
    tokenizer/     CLIP BPE (vocab.json + merges.txt)
    scheduler/     AmusedScheduler: mask_token_id, masking_schedule

``convert_amused`` writes::

    pipeline.json  base_kind "amused", the aMUSEd sampler preset, the parts below
    transformer/   the U-ViT as an orbax checkpoint (step 0) + config.json (our fields,
                   the token grid, mask id and default micro-conditioning)
    vqvae/, text_encoder/, tokenizer/, scheduler/   the diffusers folders, as published

Why the VQ and the text encoder stay diffusers folders: ``load_tokenizer`` and
``TextEncoder.from_pretrained`` read them directly (tensor by tensor, sharded, no torch)
in seconds, so a second format would only add a conversion that can go stale. The
U-ViT is converted because its parameters are restructured (fused, stacked over
layers) and restored straight into their shardings by orbax. Files are hard links when
the source is on the same file system (no copy), else copies; a weights variant
(``fp16``) is renamed to the plain name so that the run folder is uniform.

The conversion is atomic and idempotent: everything is written into a hidden sibling
folder and renamed into place at the end, and a destination whose ``pipeline.json``
records the same source files (names, sizes, modification times) and options is left
as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

from absl import logging
import jax.numpy as jnp

from muse_jax import amused, checkpointing, runs
from muse_jax.convert.diffusers_uvit import load_uvit
from muse_jax.convert.io import read_json
from muse_jax.tokenizer import TOKENIZER_FILES, has_tokenizer

PathLike = str | os.PathLike

PARTS = ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler")
COPIED = ("vqvae", "text_encoder", "tokenizer", "scheduler")
# Weight formats we never read (torch pickles, other frameworks): not copied.
_SKIPPED = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".bin.index.json")
DTYPES = ("float32", "bfloat16")


class ConversionError(ValueError):
  """The source folder cannot be converted; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class Converted:
  """What ``convert_amused`` did."""

  dst: pathlib.Path
  up_to_date: bool  # True: the destination already held this conversion; nothing written.


# ---------------------------------------------------------------------------
# Checking the source.


def check_source(src: pathlib.Path) -> None:
  """Raises ``ConversionError`` naming every missing part of an aMUSEd folder."""
  if not src.is_dir():
    raise ConversionError(f"{src} is not a folder")
  wanted = {
    "transformer": "transformer/config.json",
    "vqvae": "vqvae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
  }
  missing = [path for path in wanted.values() if not (src / path).is_file()]
  if not has_tokenizer(src / "tokenizer"):
    missing.append(f"tokenizer/ ({' or '.join(TOKENIZER_FILES)})")
  if missing:
    raise ConversionError(
      f"{src} is not a complete aMUSEd folder: missing {', '.join(missing)} "
      f"(expected {'/, '.join(PARTS)}/)"
    )


def _check_consistent(src: pathlib.Path, stage: dict[str, Any]) -> None:
  """The parts must fit together: codebook, text widths, mask id."""
  uvit = stage["uvit"]
  vq, te = read_json(src / "vqvae" / "config.json"), read_json(src / "text_encoder" / "config.json")
  te = {**te.get("text_config", {}), **te} if te.get("model_type") == "clip" else te
  codebook = uvit.get("codebook_size", 8192)
  checks = [
    ("vqvae num_vq_embeddings", vq.get("num_vq_embeddings"), "transformer codebook_size", codebook),
    (
      "text_encoder hidden_size",
      te.get("hidden_size"),
      "transformer encoder_hidden_size",
      uvit.get("encoder_hidden_size", 768),
    ),
    (
      "text_encoder projection_dim",
      te.get("projection_dim"),
      "transformer cond_embed_dim",
      uvit.get("cond_embed_dim", 768),
    ),
  ]
  for a_name, a, b_name, b in checks:
    if a != b:
      raise ConversionError(f"{src}: {a_name} is {a} but {b_name} is {b}; they must match")
  vocab = uvit.get("vocab_size", 8256)
  if not codebook <= stage["mask_id"] < vocab:
    raise ConversionError(
      f"{src}: scheduler mask_token_id {stage['mask_id']} must lie in [{codebook}, {vocab}) "
      "(after the codebook, inside the transformer's vocabulary)"
    )


def _part_files(folder: pathlib.Path, variant: str | None) -> dict[str, pathlib.Path]:
  """The files of one part to carry over: destination name -> source path.

  Safetensors weights of the requested variant (renamed to the plain name), every
  other small file (configs, tokenizer files); other weight formats are left out.
  """
  files: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    name = path.name
    if not path.is_file() or name.endswith(_SKIPPED) or name.startswith("."):
      continue
    if name.endswith((".safetensors", ".safetensors.index.json")):
      stem, rest = name.split(".", 1)  # "model", "fp16.safetensors" / "safetensors"
      plain = rest in ("safetensors", "safetensors.index.json")
      if variant is None and plain:
        files[name] = path
      elif variant is not None and rest == f"{variant}.safetensors":
        files[f"{stem}.safetensors"] = path
      continue
    files[name] = path
  return files


def _weights_of(part: str, files: dict[str, pathlib.Path], folder: pathlib.Path, variant) -> None:
  if part in ("vqvae", "text_encoder") and not any(n.endswith(".safetensors") for n in files):
    which = f"the {variant!r} variant's" if variant else "safetensors"
    raise ConversionError(
      f"{folder} holds no {which} weights (model.safetensors or "
      "diffusion_pytorch_model.safetensors); only safetensors are read"
    )


def _fingerprint(src: pathlib.Path, files: list[pathlib.Path], options: dict[str, Any]) -> str:
  h = hashlib.sha256(json.dumps({"format": amused.FORMAT, **options}, sort_keys=True).encode())
  for path in sorted(files):
    st = path.stat()
    h.update(f"{path.relative_to(src)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:20]


# ---------------------------------------------------------------------------
# Writing.


def _link_or_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  try:
    os.link(src, dst)  # follows symlinks (e.g. into a Hugging Face cache)
  except OSError:
    shutil.copy2(src, dst)


def _sampler_settings(schedule: str) -> dict[str, Any]:
  options = dataclasses.replace(amused.AMUSED_SAMPLER, schedule=schedule)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}


def _write_transformer(
  src: pathlib.Path,
  dst: pathlib.Path,
  stage: dict[str, Any],
  variant: str | None,
  param_dtype: str,
  dtype: str,
) -> None:
  _, params = load_uvit(src / "transformer", variant=variant, param_dtype=jnp.dtype(param_dtype))
  config = {
    "format": amused.FORMAT,
    "uvit": stage["uvit"],
    "grid": stage["grid"],
    "mask_id": stage["mask_id"],
    "micro_conds": stage["micro_conds"],
    "param_dtype": param_dtype,
    "dtype": dtype,
    "source": str(src / "transformer"),
  }
  with checkpointing.Checkpointer(dst, async_save=False, keep=None) as ckpt:
    ckpt.save(0, {"params": params}, force=True)
    ckpt.write_config(config)


def _remove_stale_temporaries(dst: pathlib.Path) -> None:
  """Deletes half-written conversions of ``dst`` left by killed runs."""
  for tmp in dst.parent.glob(f".{dst.name}.converting-*"):
    try:
      os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)  # still running: leave it
    except (ValueError, ProcessLookupError):
      shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError:
      pass


def convert_amused(
  src: PathLike,
  dst: PathLike,
  *,
  variant: str | None = None,
  param_dtype: str = "float32",
  dtype: str = "float32",
  force: bool = False,
) -> Converted:
  """Converts an aMUSEd folder into a run folder (see the module docstring).

  Args:
    src: the aMUSEd folder (transformer/, vqvae/, text_encoder/, tokenizer/, scheduler/).
    dst: the run folder to write; replaced if it holds an older conversion.
    variant: weights variant to read, e.g. ``"fp16"`` for ``*.fp16.safetensors``.
    param_dtype: storage dtype of the U-ViT parameters, ``float32`` or ``bfloat16``.
    dtype: the U-ViT's computation dtype when loaded (``float32`` or ``bfloat16``:
      bfloat16 products with float32 sums, ~1.7x faster on AVX512-BF16 CPUs).
    force: convert even if ``dst`` already holds this conversion.

  Returns:
    ``Converted(dst, up_to_date)``.

  Raises:
    ConversionError: a missing or inconsistent part, or a ``dst`` that is something
      else than a conversion; the message is one line naming it.
  """
  src, dst = pathlib.Path(src).resolve(), pathlib.Path(dst).absolute()
  for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
    if value not in DTYPES:
      raise ConversionError(f"{name} must be one of {DTYPES}; got {value!r}")
  check_source(src)
  if dst == src or src in dst.parents:
    raise ConversionError(f"the destination {dst} must lie outside the source {src}")
  try:
    stage = amused.stage_config_from_diffusers(src)
  except (ValueError, FileNotFoundError) as e:
    raise ConversionError(str(e)) from None
  _check_consistent(src, stage)

  copies = {part: _part_files(src / part, variant) for part in COPIED}
  for part, files in copies.items():
    _weights_of(part, files, src / part, variant)
  uvit_files = _part_files(src / "transformer", variant)
  if not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in uvit_files):
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    raise ConversionError(f"{src / 'transformer'} holds no {stem}.safetensors")
  options = {"variant": variant, "param_dtype": param_dtype, "dtype": dtype}
  every_file = [p for files in [*copies.values(), uvit_files] for p in files.values()]
  fingerprint = _fingerprint(src, every_file, options)
  record = {"source": str(src), "fingerprint": fingerprint, **options}

  spec = dst / runs.PIPELINE_FILE
  if dst.exists():
    previous = read_json(spec).get("converted_from") if spec.is_file() else None
    if previous is None:
      raise ConversionError(
        f"{dst} exists and is not an aMUSEd conversion; choose another destination or remove it"
      )
    if previous == record and not force:
      return Converted(dst, up_to_date=True)

  dst.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale_temporaries(dst)
  tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    for part, files in copies.items():
      (tmp / part).mkdir(parents=True)
      for name, path in files.items():
        _link_or_copy(path, tmp / part / name)
    logging.info("Converting the U-ViT of %s.", src)
    _write_transformer(src, tmp / "transformer", stage, variant, param_dtype, dtype)
    runs.write_layout(
      tmp,
      tokenizer="vqvae",
      text_encoder="text_encoder",
      base="transformer",
      base_kind="amused",
      base_sampler=_sampler_settings(stage["schedule"]),
      converted_from=record,
    )
    if dst.exists():
      old = dst.parent / f".{dst.name}.old-{os.getpid()}"
      os.rename(dst, old)
      os.rename(tmp, dst)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return Converted(dst, up_to_date=False)
