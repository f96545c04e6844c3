"""Pre-encoded captions: text embeddings written once, read by index during training.

Muse's encoder is frozen, so its outputs can be computed once per caption (DESIGN.md §1,
pre-encoding) and training skips T5-XXL altogether. A folder holds:

* ``text-NNNNN.safetensors``: consecutive captions' ``embeddings`` bf16 [n, T, D],
  ``mask`` bool [n, T] and, for CLIP, ``pooled`` bf16 [n, P];
* ``index.json``: the encoder and its settings, the caption count, and the finished
  shards with their first caption and count.

Writing is resumable: a shard is written to a temporary name and renamed, then the index
is rewritten, so an interrupted run restarts after the last finished shard and refuses
to mix outputs of a different encoder or caption file. ``EncodedCaptions`` reads them
back by caption index (grain's random-access source protocol).
"""

from __future__ import annotations

from collections.abc import Iterator
import itertools
import json
import os
import pathlib
from typing import Any

from absl import logging
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
import tqdm

from muse_jax.convert.io import _DTYPES as SAFETENSORS_DTYPES
from muse_jax.convert.io import PathLike, read_json, read_safetensors_header
from muse_jax.text import TextEncoder

INDEX = "index.json"
FORMAT_VERSION = 1


def count_captions(path: PathLike) -> int:
  return sum(1 for _ in iter_captions(path))


def iter_captions(path: PathLike) -> Iterator[str]:
  """Captions of a text file (one per line, empty lines are empty captions) or a .jsonl
  file (one object per line with a "caption" string; blank lines skipped)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"captions file {path} does not exist")
  jsonl = path.suffix == ".jsonl"
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not jsonl:
        yield line
        continue
      if not line.strip():
        continue
      try:
        caption = json.loads(line)["caption"]
      except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
          f'{path}:{number}: expected a JSON object with a "caption" field; got {line[:80]!r}'
        ) from None
      if not isinstance(caption, str):
        raise ValueError(
          f'{path}:{number}: "caption" must be a string; got {type(caption).__name__}'
        )
      yield caption


def _write_json(path: pathlib.Path, data: dict) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=1))
  os.replace(tmp, path)


def encode_captions(
  encoder: TextEncoder,
  captions: PathLike,
  out: PathLike,
  *,
  batch_size: int = 64,
  shard_size: int = 4096,
) -> dict[str, Any]:
  """Encodes every caption of a file into shards under ``out`` (resuming if started).

  Args:
    encoder: the text encoder.
    captions: a .txt (one caption per line) or .jsonl ("caption" field) file.
    out: output folder, created if missing.
    batch_size: prompts per encoder call.
    shard_size: captions per output file (a multiple of ``batch_size`` avoids ragged
      calls).

  Returns:
    The index (also written to ``out/index.json``).

  Raises:
    ValueError: ``out`` holds shards of another encoder, settings or caption file.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  total = count_captions(captions)
  settings = {
    "version": FORMAT_VERSION,
    "text_encoder": str(encoder.checkpoint.folder.resolve()),
    "family": encoder.family,
    "hidden_layer": encoder.hidden_layer,
    "max_length": encoder.max_length,
    "embed_dim": encoder.embed_dim,
    "pooled_dim": encoder.pooled_dim,
    "dtype": "bfloat16",
    "captions": str(pathlib.Path(captions).resolve()),
    "num_captions": total,
    "shard_size": shard_size,
  }
  index = {**settings, "shards": []}
  if (out / INDEX).is_file():
    previous = read_json(out / INDEX)
    changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
    if changed:
      raise ValueError(
        f"{out} holds an encoding made with other settings (found, now): {changed}; use another --out"
      )
    index["shards"] = [s for s in previous["shards"] if (out / s["file"]).is_file()]
  done = {s["start"] for s in index["shards"]}
  starts = [s for s in range(0, total, shard_size) if s not in done]
  if not starts:
    logging.info("%s: all %d captions already encoded", out, total)
    return index
  if done:
    logging.info(
      "%s: resuming; %d of %d shards already written", out, len(done), len(done) + len(starts)
    )

  lines = iter_captions(captions)
  position = 0
  with tqdm.tqdm(
    total=total, initial=total - sum(min(shard_size, total - s) for s in starts), unit="caption"
  ) as bar:
    for start in starts:
      lines = itertools.islice(lines, start - position, None)  # skip finished shards.
      chunk = list(itertools.islice(lines, shard_size))
      position = start + len(chunk)
      arrays = _encode_chunk(encoder, chunk, batch_size, bar)
      name = f"text-{start // shard_size:05d}.safetensors"
      save_file(
        arrays, str(out / f"{name}.tmp"), metadata={"start": str(start), "count": str(len(chunk))}
      )
      os.replace(out / f"{name}.tmp", out / name)
      index["shards"] = sorted(
        [*index["shards"], {"file": name, "start": start, "count": len(chunk)}],
        key=lambda s: s["start"],
      )
      _write_json(out / INDEX, index)
  return index


def _encode_chunk(
  encoder: TextEncoder, chunk: list[str], batch_size: int, bar: tqdm.tqdm
) -> dict[str, np.ndarray]:
  """Encodes one shard's captions; the next batch is tokenized while one runs."""
  parts: dict[str, list[np.ndarray]] = {"embeddings": [], "mask": [], "pooled": []}
  pending = None

  def fetch(result, n):
    parts["embeddings"].append(np.asarray(result.embeddings.astype(jnp.bfloat16)))
    parts["mask"].append(np.asarray(result.mask))
    if result.pooled is not None:
      parts["pooled"].append(np.asarray(result.pooled.astype(jnp.bfloat16)))
    bar.update(n)

  for i in range(0, len(chunk), batch_size):
    batch = chunk[i : i + batch_size]
    result = encoder.encode(batch)  # dispatched asynchronously.
    if pending is not None:
      fetch(*pending)
    pending = (result, len(batch))
  fetch(*pending)
  return {k: np.concatenate(v) for k, v in parts.items() if v}


class EncodedCaptions:
  """Random access to pre-encoded captions: ``encoded[i] -> {"embeddings", "mask", ("pooled")}``.

  Each lookup reads one row of each tensor straight from its byte offset in the shard.
  """

  def __init__(self, folder: PathLike):
    self.folder = pathlib.Path(folder)
    self.index = read_json(self.folder / INDEX)
    covered = sum(s["count"] for s in self.index["shards"])
    if covered != self.index["num_captions"]:
      raise ValueError(
        f"{self.folder}: the encoding is incomplete ({covered} of {self.index['num_captions']} captions); "
        "run `muse-jax encode-text` again with the same arguments to finish it"
      )
    self._starts = np.array([s["start"] for s in self.index["shards"]])
    self._headers: dict[str, tuple[dict, int]] = {}

  def __len__(self) -> int:
    return self.index["num_captions"]

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"caption {i} is out of range for {len(self)} encoded captions")
    shard = self.index["shards"][int(np.searchsorted(self._starts, i, side="right")) - 1]
    path = self.folder / shard["file"]
    if shard["file"] not in self._headers:
      self._headers[shard["file"]] = read_safetensors_header(path)
    header, offset = self._headers[shard["file"]]
    row = i - shard["start"]
    out = {}
    with open(path, "rb") as f:
      for key, info in header.items():
        shape = info["shape"][1:]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        size = dtype.itemsize * int(np.prod(shape))
        f.seek(offset + info["data_offsets"][0] + row * size)
        out[key] = np.frombuffer(f.read(size), dtype=dtype).reshape(shape)
    return out
