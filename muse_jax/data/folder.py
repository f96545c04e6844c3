"""A folder of images with captions: the source a Colab user has.

Captions come from, in this order of preference:
- `captions.jsonl` in the folder (or the file named in the config): one JSON object per
  line with the image path relative to the folder ("file", "file_name", "image", "path"
  or "filename") and its caption ("caption", "text" or "prompt");
- `captions.csv`: a header row naming the same columns;
- otherwise a sidecar `<image stem>.txt` beside each image (images found recursively).

The captions file is parsed when the source is built, but a malformed row does not fail
the build: it becomes an example that the pipeline skips and counts (`bad_record`), like
every other bad example. Bytes that are not UTF-8 are kept as bytes so that the pipeline
can convert them and count them.
"""

import csv
import io
import json
import os

from etils import epath

from muse_jax.data import common

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILE_COLUMNS = ("file", "file_name", "image", "path", "filename")
CAPTION_COLUMNS = ("caption", "text", "prompt")


def _pick(row: dict, names: tuple[str, ...]):
  return next((row[n] for n in names if n in row), None)


def _parse_jsonl(data: bytes) -> list[tuple]:
  """Rows (file, caption, error, events) from a captions.jsonl file's bytes."""
  rows = []
  for line in data.splitlines():
    if not line.strip():
      continue
    events = ()
    try:
      try:
        row = json.loads(line)
      except UnicodeDecodeError:  # JSON must be UTF-8; keep the row and count the repair
        row, events = json.loads(line.decode("cp1252", "replace")), ("caption_not_utf8",)
    except json.JSONDecodeError:
      rows.append((None, None, "bad_record", ()))
      continue
    file = _pick(row, FILE_COLUMNS) if isinstance(row, dict) else None
    if not isinstance(file, str) or not file:
      rows.append((None, None, "bad_record", ()))
      continue
    rows.append((file, _pick(row, CAPTION_COLUMNS), None, events))
  return rows


def _parse_csv(data: bytes) -> list[tuple]:
  """Rows (file, caption, error, events) from a captions.csv file's bytes."""
  # surrogateescape keeps bytes that are not UTF-8, to be converted and counted later.
  reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig", "surrogateescape"), newline=""))
  columns = reader.fieldnames or []
  if not any(c in columns for c in FILE_COLUMNS):
    raise ValueError(
      f"captions.csv header {columns} names no file column; expected one of {FILE_COLUMNS}"
    )
  rows = []
  for row in reader:
    file = _pick(row, FILE_COLUMNS)
    if not file:
      rows.append((None, None, "bad_record", ()))
    else:
      rows.append((file, _pick(row, CAPTION_COLUMNS), None, ()))
  return rows


class FolderSource:
  """Random-access source over a folder of images and captions."""

  def __init__(self, path: str | os.PathLike, captions: str = "", *, retries: int = 3):
    """Lists the examples.

    Args:
      path: the folder (local, or gs:// through etils.epath).
      captions: a captions file (.jsonl or .csv), absolute or relative to the folder;
        default: captions.jsonl or captions.csv in the folder if present, else sidecars.
      retries: reads retried on I/O errors before an example is skipped as unreadable.
    """
    self.root = epath.Path(path)
    self.retries = retries
    if not self.root.is_dir():
      raise ValueError(f"image folder {str(path)!r} does not exist or is not a folder")
    if captions:
      file = epath.Path(captions)
      file = file if file.is_absolute() or "://" in str(captions) else self.root / captions
      if not file.exists():
        raise ValueError(f"captions file {str(file)!r} does not exist")
    else:
      file = next(
        (self.root / n for n in ("captions.jsonl", "captions.csv") if (self.root / n).exists()),
        None,
      )
    self.captions_file = str(file) if file else ""
    if file is None:
      images = sorted(
        directory / name
        for directory, _, names in self.root.walk()
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
      )
      # Caption None means "read the sidecar"; relative paths keep pickles small.
      self.rows = [(str(p.relative_to(self.root)), None, None, ()) for p in images]
    elif file.suffix.lower() == ".csv":
      self.rows = _parse_csv(file.read_bytes())
    else:
      self.rows = _parse_jsonl(file.read_bytes())
    if not self.rows:
      raise ValueError(
        f"no examples in {str(path)!r}: no captions.jsonl / captions.csv rows and no images "
        f"with extensions {IMAGE_EXTENSIONS}"
      )

  def __repr__(self) -> str:
    return f"FolderSource({str(self.root)!r}, captions={self.captions_file!r}, n={len(self.rows)})"

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict:
    file, caption, error, events = self.rows[int(index)]
    record = {"key": file or f"row-{index}", "events": events}
    if error:
      return record | {"error": error}
    path = self.root / file
    try:
      record["image"] = common.read_with_retries(path.read_bytes, self.retries)
    except FileNotFoundError:
      return record | {"error": "missing_image"}
    except Exception:  # after the retries, whatever it is: skip and count, never stop
      return record | {"error": "read_error"}
    if self.captions_file:
      record["caption"] = caption
    else:
      try:
        record["caption"] = common.read_with_retries(
          path.with_suffix(".txt").read_bytes, self.retries
        )
      except OSError:  # no sidecar: the pipeline counts a missing caption
        record["caption"] = None
    return record
