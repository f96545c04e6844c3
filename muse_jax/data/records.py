"""The record format of pre-encoded shards: named numpy arrays and strings in one blob.

One ArrayRecord record per example. A record is

  b"MJR1" | uint32 little-endian header length | JSON header | raw array bytes

where the header lists each field as [name, dtype, shape, offset, length] and strings are
stored as UTF-8 with dtype "str". bfloat16 arrays (text embeddings) are stored as they are,
through ml_dtypes. The format needs nothing beyond numpy, reads without copying, and
fails loudly on anything else.
"""

from collections.abc import Mapping
import json
import struct

import ml_dtypes
import numpy as np

MAGIC = b"MJR1"
_EXTRA_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _dtype(name: str) -> np.dtype:
  return _EXTRA_DTYPES.get(name) or np.dtype(name)


def pack(example: Mapping[str, np.ndarray | str]) -> bytes:
  """Serialises a flat dict of arrays and strings."""
  fields, chunks, offset = [], [], 0
  for name, value in example.items():
    if isinstance(value, str):
      data, dtype, shape = value.encode("utf-8"), "str", []
    else:
      array = np.ascontiguousarray(value)
      if array.dtype == object:
        raise TypeError(f"field {name!r} has dtype object; expected a numeric array or a str")
      data, dtype, shape = array.tobytes(), array.dtype.name, list(array.shape)
    fields.append([name, dtype, shape, offset, len(data)])
    chunks.append(data)
    offset += len(data)
  header = json.dumps(fields, separators=(",", ":")).encode()
  return b"".join([MAGIC, struct.pack("<I", len(header)), header, *chunks])


def unpack(record: bytes) -> dict[str, np.ndarray | str]:
  """Reads a record written by `pack`.

  Raises:
    ValueError: the bytes are not such a record (wrong magic, short, bad header).
  """
  if len(record) < 8 or record[:4] != MAGIC:
    raise ValueError(
      f"not a muse_jax record: starts with {bytes(record[:4])!r}, expected {MAGIC!r}"
    )
  (length,) = struct.unpack("<I", record[4:8])
  body = 8 + length
  try:
    fields = json.loads(bytes(record[8:body]))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"record header is not JSON: {e}") from None
  view = memoryview(record)[body:]
  out = {}
  for name, dtype, shape, offset, size in fields:
    if offset + size > len(view):
      raise ValueError(f"record field {name!r} ends at {offset + size} of {len(view)} bytes")
    chunk = view[offset : offset + size]
    if dtype == "str":
      out[name] = bytes(chunk).decode("utf-8")
    else:
      out[name] = np.frombuffer(chunk, _dtype(dtype)).reshape(shape)
  return out
