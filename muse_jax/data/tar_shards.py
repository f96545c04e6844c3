"""WebDataset-style tar shards (LAION / CC3M / COYO dumps), read by random access.

A shard is an uncompressed tar whose members are grouped into examples by key: the member
path up to the first dot of its base name (`00042/000421337.jpg` and `.txt` share the key
`00042/000421337`), as WebDataset does. An example takes its image from the first member
with an image extension and its caption from `.txt`, else from `.json` ("caption", "text"
or "TEXT").

Random access needs an index: each shard's tar headers are read once (seeking past the
data, so a 1 GB shard costs a few thousand small reads) in parallel threads when the
source is built, and cached as JSON in `index_dir` when one is given. An example is then
one read of the byte range spanning its members: `os.pread` on local disks, a ranged read
through etils.epath for gs://. With random access, grain's global shuffle, exact resume
and per-host splits work exactly as for any other source.

Hosts split the shards, not the examples (host p takes shards p, p + P, ...), so that each
host indexes and reads only its own files. A shard that cannot be indexed is logged and
counted (`skipped/bad_shard`, at start-up), and the job goes on; so is a shard that ends
early, which gives the examples that are whole.
"""

import collections
import concurrent.futures
import glob as globlib
import hashlib
import json
import os
import re
import tarfile
import threading

from absl import logging
from etils import epath

from muse_jax.data import common

DEFAULT_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
DEFAULT_CAPTION_EXTENSIONS = ("txt", "json")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_MAX_SPAN = 64 << 20  # read members separately when they lie further apart than this
_OPEN_FILES_PER_THREAD = 8

Member = tuple[int, int]  # (offset of the data, size)


def expand_paths(spec: str) -> list[str]:
  """Shard paths from a comma-separated list of globs and `{000..099}` ranges, sorted."""
  paths = []
  for pattern in filter(None, (p.strip() for p in spec.split(","))):
    patterns = [pattern]
    while any(_BRACES.search(p) for p in patterns):
      expanded = []
      for p in patterns:
        m = _BRACES.search(p)
        if not m:
          expanded.append(p)
          continue
        width = len(m[1])
        for i in range(int(m[1]), int(m[2]) + 1):
          expanded.append(p[: m.start()] + str(i).zfill(width) + p[m.end() :])
      patterns = expanded
    for p in patterns:
      if not any(ch in p for ch in "*?["):
        paths.append(p)
      elif "://" in p:
        head = p[: min(p.index(ch) for ch in "*?[" if ch in p)].rsplit("/", 1)[0]
        paths.extend(str(x) for x in epath.Path(head).glob(p[len(head) + 1 :]))
      else:
        paths.extend(globlib.glob(p))
  if not paths:
    raise ValueError(f"no tar shards match {spec!r}")
  for p in paths:
    if p.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
      raise ValueError(
        f"shard {p!r} is compressed; random access needs plain .tar shards (decompress them, or "
        "pre-encode the data with `muse-jax preencode`)"
      )
  return sorted(set(paths))


def split_key(name: str) -> tuple[str, str]:
  """WebDataset's (key, extension) of a member path: split at the base name's first dot."""
  directory, _, base = name.rpartition("/")
  stem, _, extension = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), extension.lower()


def index_shard(path: str) -> tuple[list[tuple[str, dict[str, Member]]], bool]:
  """Reads a shard's tar headers.

  Returns:
    ([(key, {extension: (offset, size)})] in file order, whether the shard is whole). A
    shard that ends early gives the members that are whole.

  Raises:
    tarfile.ReadError: the file is not a tar file.
  """
  examples: dict[str, dict[str, Member]] = {}
  whole = True
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
          if info.offset_data + info.size > size:
            whole = False
          elif info.isfile():
            key, extension = split_key(info.name)
            examples.setdefault(key, {})[extension] = (info.offset_data, info.size)
        # A tar file ends with two zero blocks; without them it was cut at a member boundary.
        whole = whole and size - tar.offset >= 2 * tarfile.BLOCKSIZE
    except tarfile.ReadError:
      if not examples:
        raise
      whole = False
  if not whole:
    logging.warning("tar shard %s ends early; using its %d whole examples", path, len(examples))
  return list(examples.items()), whole


def _cache_file(index_dir: str, path: str) -> epath.Path:
  stat = epath.Path(path).stat()
  tag = hashlib.sha1(f"{path}:{stat.length}:{stat.mtime}".encode()).hexdigest()[:16]
  return epath.Path(index_dir) / f"{os.path.basename(path)}.{tag}.json"


def _load_index(path: str, index_dir: str) -> tuple[list[tuple[str, dict[str, Member]]], bool]:
  cache = _cache_file(index_dir, path) if index_dir else None
  if cache is not None and cache.exists():
    cached = json.loads(cache.read_text())
    index = [(k, {e: tuple(m) for e, m in v.items()}) for k, v in cached["examples"]]
    return index, cached["whole"]
  index, whole = index_shard(path)
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"examples": index, "whole": whole}))
    tmp.replace(cache)
  return index, whole


class TarSource:
  """Random-access source over this host's part of a set of tar shards."""

  def __init__(
    self,
    paths: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    index_dir: str = "",
    image_extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS,
    caption_extensions: tuple[str, ...] = DEFAULT_CAPTION_EXTENSIONS,
    index_threads: int = 16,
    retries: int = 3,
  ):
    """Indexes this host's shards.

    Args:
      paths: comma-separated globs or brace ranges, local or gs://.
      process_index: this host.
      process_count: number of hosts; host p reads shards p, p + P, ...
      index_dir: where to cache shard indices ("" = no cache).
      image_extensions: member extensions taken as the image, in order of preference.
      caption_extensions: "txt" and/or "json", in order of preference.
      index_threads: shards indexed in parallel.
      retries: reads retried on I/O errors before an example is skipped as unreadable.
    """
    all_paths = expand_paths(paths)
    self.spec = paths
    self.shards = all_paths[process_index::process_count]
    if not self.shards:
      raise ValueError(
        f"host {process_index} of {process_count} gets no shard: {len(all_paths)} shards match "
        f"{paths!r}; use at least as many shards as hosts"
      )
    self.image_extensions = tuple(e.lower() for e in image_extensions)
    self.caption_extensions = tuple(e.lower() for e in caption_extensions)
    self.retries = retries
    self.bad_shards = 0  # not tar files, or cut short
    self.examples: list[tuple[int, dict[str, Member]]] = []  # (shard number, members)
    self.keys: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(index_threads) as pool:
      futures = [pool.submit(_load_index, p, index_dir) for p in self.shards]
      for shard, (path, future) in enumerate(zip(self.shards, futures, strict=True)):
        try:
          index, whole = future.result()
        except (OSError, tarfile.TarError) as e:
          logging.warning("skipping tar shard %s: it cannot be read as a tar file (%s)", path, e)
          self.bad_shards += 1
          continue
        self.bad_shards += not whole
        for key, members in index:
          self.examples.append((shard, members))
          self.keys.append(key)
    if not self.examples:
      raise ValueError(f"the {len(self.shards)} shards of host {process_index} hold no examples")
    self._local = threading.local()

  def __repr__(self) -> str:
    return f"TarSource({self.spec!r}, shards={len(self.shards)}, n={len(self.examples)})"

  @property
  def startup_events(self) -> dict[str, int]:
    return {"skipped/bad_shard": self.bad_shards} if self.bad_shards else {}

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_local"]  # open file descriptors do not cross processes
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def __len__(self) -> int:
    return len(self.examples)

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    path = self.shards[shard]
    if "://" in path:
      with epath.Path(path).open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    else:
      # A few open descriptors per thread (pread needs no shared file position); the least
      # recently used one is closed, by the thread that owns it.
      fds = self._local.__dict__.setdefault("fds", collections.OrderedDict())
      if shard in fds:
        fds.move_to_end(shard)
      else:
        if len(fds) >= _OPEN_FILES_PER_THREAD:
          os.close(fds.popitem(last=False)[1])
        fds[shard] = os.open(path, os.O_RDONLY)
      data = os.pread(fds[shard], size, offset)
    if len(data) != size:
      raise OSError(f"short read from {path}: {len(data)} of {size} bytes at {offset}")
    return data

  def _read_members(self, shard: int, members: dict[str, Member]) -> dict[str, bytes]:
    start = min(o for o, _ in members.values())
    end = max(o + s for o, s in members.values())
    if end - start <= _MAX_SPAN:  # usually: image and caption are neighbours
      blob = self._read(shard, start, end - start)
      return {e: blob[o - start : o - start + s] for e, (o, s) in members.items()}
    return {e: self._read(shard, o, s) for e, (o, s) in members.items()}

  def __getitem__(self, index: int) -> dict:
    shard, members = self.examples[int(index)]
    record = {"key": f"{os.path.basename(self.shards[shard])}/{self.keys[int(index)]}"}
    image = next((e for e in self.image_extensions if e in members), None)
    caption = next((e for e in self.caption_extensions if e in members), None)
    if image is None:
      return record | {"error": "missing_image"}
    wanted = {e: members[e] for e in (image, caption) if e is not None}
    try:
      data = common.read_with_retries(lambda: self._read_members(shard, wanted), self.retries)
    except Exception:  # after the retries, whatever it is: skip and count, never stop
      return record | {"error": "read_error"}
    record["image"] = data[image]
    if caption == "json":
      record.update(_json_caption(data["json"]))
    elif caption is not None:
      record["caption"] = data[caption]
    return record


def _json_caption(data: bytes) -> dict:
  """The caption of a WebDataset .json member, as record fields."""
  events = ()
  try:
    try:
      meta = json.loads(data)
    except UnicodeDecodeError:
      meta, events = json.loads(data.decode("cp1252", "replace")), ("caption_not_utf8",)
  except json.JSONDecodeError:
    return {"error": "bad_record"}
  if not isinstance(meta, dict):
    return {"error": "bad_record"}
  return {
    "caption": next((meta[k] for k in ("caption", "text", "TEXT") if k in meta), None),
    "events": events,
  }
