"""Reading the PyTorch peers' folders: config.json and (sharded) safetensors, lazily.

Weights are read tensor by tensor from the safetensors header's byte offsets, so a
converter can place each tensor straight onto its devices and peak host memory stays
near one tensor, not the whole model. No torch is needed, and bfloat16 works (the
safetensors numpy backend cannot read it; ml_dtypes can).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import json
import os
import pathlib

import ml_dtypes
import numpy as np

PathLike = str | os.PathLike

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def read_safetensors_header(path: PathLike) -> tuple[dict, int]:
  """Returns ``(header, data_offset)``: tensor name -> {dtype, shape, data_offsets}."""
  with open(path, "rb") as f:
    (n,) = np.frombuffer(f.read(8), dtype="<u8")
    header = json.loads(f.read(int(n)))
  header.pop("__metadata__", None)
  return header, 8 + int(n)


def read_tensor(path: PathLike, info: dict, data_offset: int) -> np.ndarray:
  """Reads one tensor described by a header entry."""
  if info["dtype"] not in _DTYPES:
    raise ValueError(
      f"{path}: dtype {info['dtype']} is not supported; expected one of {sorted(_DTYPES)}"
    )
  start, end = info["data_offsets"]
  with open(path, "rb") as f:
    f.seek(data_offset + start)
    buf = f.read(end - start)
  return np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_json(path: PathLike) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path.parent}: missing {path.name}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class SafetensorsFolder(Mapping[str, np.ndarray]):
  """A read-only, lazy mapping ``tensor name -> np.ndarray`` over one checkpoint.

  Handles a single ``<stem>.safetensors`` file and a sharded checkpoint described by
  ``<stem>.safetensors.index.json`` (Hugging Face layout). Each lookup reads one
  tensor from disk; nothing is cached.
  """

  def __init__(
    self, folder: PathLike, stems: tuple[str, ...] = ("model", "diffusion_pytorch_model")
  ):
    """Opens the first of ``<stem>.safetensors`` / ``<stem>.safetensors.index.json`` found.

    Args:
      folder: the checkpoint folder.
      stems: file stems to look for, in order.

    Raises:
      FileNotFoundError: naming the folder and the file names looked for.
    """
    self.folder = pathlib.Path(folder)
    self._file_of: dict[str, pathlib.Path] = {}
    self._headers: dict[pathlib.Path, tuple[dict, int]] = {}
    for stem in stems:
      single = self.folder / f"{stem}.safetensors"
      index = self.folder / f"{stem}.safetensors.index.json"
      if single.is_file():
        self._file_of = {k: single for k in self._header(single)[0]}
        break
      if index.is_file():
        weight_map = read_json(index)["weight_map"]
        missing = sorted({v for v in weight_map.values() if not (self.folder / v).is_file()})
        if missing:
          raise FileNotFoundError(
            f"{self.folder}: {index.name} names shard files that are missing: {missing}"
          )
        self._file_of = {k: self.folder / v for k, v in weight_map.items()}
        break
    else:
      wanted = [f"{s}.safetensors[.index.json]" for s in stems]
      raise FileNotFoundError(f"{self.folder}: no weights found; expected one of {wanted}")

  def __getitem__(self, name: str) -> np.ndarray:
    try:
      path = self._file_of[name]
    except KeyError:
      raise KeyError(f"{self.folder}: tensor {name!r} is not in the checkpoint") from None
    header, offset = self._header(path)
    return read_tensor(path, header[name], offset)

  def _header(self, path: pathlib.Path) -> tuple[dict, int]:
    if path not in self._headers:
      self._headers[path] = read_safetensors_header(path)
    return self._headers[path]

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, read from the header without loading the data."""
    return tuple(self._header(self._file_of[name])[0][name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(_DTYPES[self._header(self._file_of[name])[0][name]["dtype"]])

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)
