"""Pre-encoding: run the frozen tokenizers and text encoder over a source once, to shards.

The transformer stages (paper §2.3, §2.4) see images only as token ids and text only as
frozen-encoder outputs; computing both once and storing them lets training skip the
frozen models (open-muse measured ~30% less step time) and decode no images.

Output folder:

    metadata.json                  tokenizers (name, resolution, id grid), text (T, D, P)
    uncond.npz                     the empty prompt's text_emb [T, D] / text_mask [T]
    shard-h002of064-00017.array_record
                                   one packed record (records.py) per example: ids_<name>
                                   [h, w] per tokenizer, text_emb (bf16) and text_mask cut
                                   after the last real token, text_pooled (bf16, CLIP),
                                   caption, key
    shard-h002of064-00017.json     the shard's counts: examples written, skipped by reason
    host-002-of-064.json           host 2 has finished: its totals

Each host encodes its own part of the source (`sources.make_source`: disjoint parts,
together complete), cut into shards of E = `examples_per_shard` source examples; shard s
of host p holds those of its examples [s E, (s + 1) E) that survive decoding. A shard is
written under a temporary name and renamed when complete, so a killed job never leaves
half a shard, and a restarted one (with the same number of hosts) skips the shards that
exist. Images are cut with a centred crop at each tokenizer's resolution (the random crops
of on-line training are traded for speed).
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import math
import os
import tempfile
from typing import Any

from absl import logging
from etils import epath
import grain
import ml_dtypes
import numpy as np
import tqdm

from muse_jax.data import records, sources, transforms
from muse_jax.data.transforms import EVENTS, EVENTS_KEY, SKIP

FORMAT = "muse_jax.preencoded/1"
UNCOND_FILE = "uncond.npz"
_WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per chunk: cheap random access


@dataclasses.dataclass(frozen=True)
class ImageTokenizer:
  """One frozen image tokenizer: its name (feature "ids_<name>"), crop size and encoder."""

  name: str  # e.g. "256": the feature is "ids_256"
  resolution: int  # side of the centred crop it encodes
  encode: Callable[[np.ndarray], Any]  # uint8 [B, R, R, 3] -> int ids [B, h, w]


# (captions) -> (text_emb [B, T, D], text_mask [B, T]) or (..., text_pooled [B, P])
TextEncodeFn = Callable[[list[str]], tuple]


def shard_name(process_index: int, process_count: int, shard: int) -> str:
  return f"shard-h{process_index:03d}of{process_count:03d}-{shard:05d}{sources.PREENCODED_SUFFIX}"


def host_marker(process_index: int, process_count: int) -> str:
  return f"host-{process_index:03d}-of-{process_count:03d}.json"


@dataclasses.dataclass(frozen=True)
class _Decode:
  """Raw record -> centred uint8 crops at each resolution + caption, or a skip marker."""

  resolutions: tuple[int, ...]
  min_image_fraction: float

  def __call__(self, index: int, raw: dict) -> dict:
    rng = np.random.default_rng([0, index])  # only picks among several captions
    transform = transforms.ImageTransform(
      resolution=max(self.resolutions), crop="center", min_image_fraction=self.min_image_fraction
    )
    try:
      caption, caption_events = transforms.decode_caption(raw.get("caption"), rng)
      image, events, reason = transform.decode(raw, rng)
      events += caption_events
      if reason:
        return transforms.skipped(reason, events)
      if not caption:
        return transforms.skipped("missing_caption" if caption is None else "empty_caption", events)
      crops = {}
      for r in self.resolutions:
        crops[r] = transform.crop_resize(image, rng, events, r)
        if crops[r] is None:
          return transforms.skipped("image_too_small", events)
    except Exception as e:  # never stop a pass over millions of files for one of them
      logging.log_every_n(logging.WARNING, "skipping example %s: %r", 100, raw.get("key"), e)
      return transforms.skipped("unexpected_error")
    return {
      "crops": crops,
      "caption": caption,
      "key": str(raw.get("key", index)),
      EVENTS_KEY: events,
    }


def _trim(emb: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cuts one example's text after its last real token (padding is restored on reading)."""
  real = np.flatnonzero(mask)
  t = int(real[-1]) + 1 if real.size else 1
  return emb[:t], mask[:t]


class _ShardWriter:
  """Writes a shard to a temporary file and publishes it whole."""

  def __init__(self, final: epath.Path):
    from array_record.python.array_record_module import ArrayRecordWriter

    self.final = final
    local = "://" not in str(final)
    directory = str(final.parent) if local else tempfile.gettempdir()
    self.tmp = os.path.join(directory, f".{final.name}.tmp{os.getpid()}")
    self.writer = ArrayRecordWriter(self.tmp, _WRITER_OPTIONS)

  def write(self, record: bytes) -> None:
    self.writer.write(record)

  def publish(self) -> None:
    self.writer.close()
    if "://" in str(self.final):  # an object store: the object appears when the upload ends
      epath.Path(self.tmp).copy(self.final, overwrite=True)
      os.remove(self.tmp)
    else:
      os.replace(self.tmp, self.final)  # atomic on one file system


def _write_json(path: epath.Path, value: Any) -> None:
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  tmp.write_text(json.dumps(value, indent=2) + "\n")
  tmp.replace(path)


def _batches(examples, batch_size: int, counts: np.ndarray, bar: tqdm.tqdm):
  """Lists of up to `batch_size` good examples; every example's events go into `counts`."""
  pending = []
  for example in examples:
    bar.update(1)
    counts += np.bincount(np.asarray(example[EVENTS_KEY], np.int64), minlength=len(EVENTS))
    if SKIP not in example:
      pending.append(example)
      if len(pending) == batch_size:
        yield pending
        pending = []
  if pending:
    yield pending


def _write_metadata(out: epath.Path, metadata: dict, encode_text: TextEncodeFn) -> None:
  """metadata.json, and the empty prompt's encoding for classifier-free guidance."""
  uncond = encode_text([""])
  emb, mask = np.asarray(uncond[0])[0], np.asarray(uncond[1], bool)[0]
  with (out / UNCOND_FILE).open("wb") as f:
    np.savez(f, text_emb=emb.astype(np.float32), text_mask=mask)
  _write_json(out / sources.PREENCODED_METADATA, metadata)


def _metadata(
  tokenizers, ids, emb, pooled, text_length, examples_per_shard, process_count, description
):
  return {
    "format": FORMAT,
    "source": description,
    "examples_per_shard": examples_per_shard,
    "process_count": process_count,
    "tokenizers": {
      t.name: {
        "feature": f"ids_{t.name}",
        "resolution": t.resolution,
        "grid": list(ids[t.name].shape[1:]),
      }
      for t in tokenizers
    },
    "text": {
      "length": int(text_length or emb.shape[1]),
      "dim": int(emb.shape[-1]),
      "pooled_dim": None if pooled is None else int(pooled.shape[-1]),
    },
  }


class _Encoder:
  """Pads a batch to a fixed size (one compile), runs every encoder, packs records."""

  def __init__(
    self, tokenizers: Sequence[ImageTokenizer], encode_text: TextEncodeFn, batch_size: int
  ):
    self.tokenizers, self.encode_text, self.batch_size = tokenizers, encode_text, batch_size

  def __call__(
    self, examples: list[dict]
  ) -> tuple[list[bytes], dict, np.ndarray, np.ndarray | None]:
    n = len(examples)
    padded = examples + [examples[-1]] * (self.batch_size - n)
    ids = {}
    for t in self.tokenizers:
      ids[t.name] = np.asarray(t.encode(np.stack([e["crops"][t.resolution] for e in padded])))
    text = self.encode_text([e["caption"] for e in padded])
    emb, mask = np.asarray(text[0]), np.asarray(text[1], bool)
    pooled = np.asarray(text[2]) if len(text) > 2 and text[2] is not None else None
    out = []
    for i, e in enumerate(examples):
      record = {}
      for name, grid in ids.items():
        record[f"ids_{name}"] = grid[i].astype(np.uint16 if grid.max() < 2**16 else np.int32)
      record["text_emb"], record["text_mask"] = _trim(emb[i].astype(ml_dtypes.bfloat16), mask[i])
      if pooled is not None:
        record["text_pooled"] = pooled[i].astype(ml_dtypes.bfloat16)
      record["caption"], record["key"] = e["caption"], e["key"]
      out.append(records.pack(record))
    return out, ids, emb, pooled


def preencode(
  source: Any,
  out_dir: str | os.PathLike,
  *,
  tokenizers: Sequence[ImageTokenizer],
  encode_text: TextEncodeFn,
  batch_size: int = 64,
  examples_per_shard: int = 4096,
  process_index: int = 0,
  process_count: int = 1,
  min_image_fraction: float = 0.5,
  num_threads: int = 16,
  text_length: int = 0,
  description: str = "",
  progress: bool = True,
) -> dict[str, int]:
  """Encodes this host's shards of `source` into `out_dir`.

  Args:
    source: this host's part of the source, raw records (`sources.make_source`).
    out_dir: output folder, local or gs://.
    tokenizers: the image tokenizers; each adds an "ids_<name>" feature.
    encode_text: captions -> (text_emb, text_mask[, text_pooled]).
    batch_size: examples per encoder call (the last batch of a shard is padded to it).
    examples_per_shard: source examples per shard (E).
    process_index: this host (names its shards).
    process_count: number of hosts (names the shards: resume with the same count).
    min_image_fraction: images whose shorter side is below this x a tokenizer's
      resolution are skipped; larger ones too small are upscaled.
    num_threads: read / decode threads.
    text_length: T recorded for readers (0 = the encoder's output length).
    description: recorded in metadata.json (e.g. the source's path).
    progress: show a tqdm bar.

  Returns:
    Counts: shards written and skipped as done, examples written, and the events.
  """
  if not tokenizers:
    raise ValueError("pre-encoding needs at least one image tokenizer")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  n = len(source)
  names = [
    shard_name(process_index, process_count, s) for s in range(math.ceil(n / examples_per_shard))
  ]
  todo = [s for s, name in enumerate(names) if not (out / name).exists()]
  for s in todo:  # what a killed run of this host left behind
    for stale in out.glob(f".{names[s]}.tmp*"):
      stale.unlink()
  totals = {"shards_written": 0, "shards_already_done": len(names) - len(todo), "examples": 0}
  counts = np.zeros(len(EVENTS), np.int64)
  decode = _Decode(tuple(sorted({t.resolution for t in tokenizers})), min_image_fraction)
  encoder = _Encoder(tokenizers, encode_text, batch_size)
  ranges = {s: (s * examples_per_shard, min(n, (s + 1) * examples_per_shard)) for s in todo}
  bar = tqdm.tqdm(
    total=sum(b - a for a, b in ranges.values()), disable=not progress, unit="ex", desc="preencode"
  )
  have_metadata = (out / sources.PREENCODED_METADATA).exists()
  for shard, (start, stop) in ranges.items():
    ds = grain.MapDataset.source(source)[start:stop].map_with_index(decode)
    examples = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
    )
    writer = _ShardWriter(out / names[shard])
    shard_counts = np.zeros(len(EVENTS), np.int64)
    written = 0
    for batch in _batches(examples, batch_size, shard_counts, bar):
      packed, ids, emb, pooled = encoder(batch)
      for record in packed:
        writer.write(record)
      written += len(packed)
      if not have_metadata:
        meta = _metadata(
          tokenizers, ids, emb, pooled, text_length, examples_per_shard, process_count, description
        )
        _write_metadata(out, meta, encode_text)
        have_metadata = True
    stats = {"examples": written, "source_range": [start, stop]}
    stats.update({name: int(c) for name, c in zip(EVENTS, shard_counts, strict=True) if c})
    _write_json(out / names[shard].replace(sources.PREENCODED_SUFFIX, ".json"), stats)
    writer.publish()
    totals["shards_written"] += 1
    totals["examples"] += written
    counts += shard_counts
  bar.close()
  totals.update({name: int(c) for name, c in zip(EVENTS, counts, strict=True) if c})
  _write_json(out / host_marker(process_index, process_count), totals | {"shards": len(names)})
  return totals


# ----------------------------------------------------------------------------- loaders


def parse_tokenizer(spec: str) -> tuple[str, int, str]:
  """`[NAME@]RESOLUTION=PATH` -> (name, resolution, path)."""
  head, sep, path = spec.partition("=")
  name, _, resolution = head.rpartition("@")
  if not sep or not path or not resolution.isdigit():
    raise ValueError(f"--tokenizer={spec!r} is not [NAME@]RESOLUTION=PATH, e.g. 256=/ckpt/vq_f16")
  return name or resolution, int(resolution), path


def image_tokenizer(name: str, resolution: int, path: str, mesh) -> ImageTokenizer:
  """A VQ tokenizer whose batch is split over this host's devices."""
  import jax

  from muse_jax import partitioning
  from muse_jax.vq_tokenizer import load_tokenizer

  tokenizer = load_tokenizer(path)
  params = jax.device_put(tokenizer.params, partitioning.replicated(mesh))
  tokenizer = tokenizer._replace(params=params)
  logging.info("tokenizer %s: %s at %d px", name, path, resolution)

  def encode(images: np.ndarray) -> np.ndarray:  # uint8 [B, R, R, 3] -> ids [B, h, w]
    return np.asarray(tokenizer.encode(partitioning.shard_batch(images, mesh)))

  return ImageTokenizer(name, resolution, encode)


def text_encoder(path: str, length: int, dtype: str, mesh) -> TextEncodeFn:
  import jax.numpy as jnp

  from muse_jax.text import TextEncoder

  encoder = TextEncoder.from_pretrained(
    path, max_length=length or None, dtype=jnp.dtype(dtype), mesh=mesh
  )
  logging.info("text encoder: %r", encoder)

  def encode(captions: list[str]) -> tuple:
    out = encoder.encode(captions)
    pooled = None if out.pooled is None else np.asarray(out.pooled, np.float32)
    return np.asarray(out.embeddings, np.float32), np.asarray(out.mask), pooled

  return encode
