"""The grain input pipeline: what every trainer reads.

    it = make_iterator(config.data, batch_size=per_host_batch, seed=config.seed)
    batch = next(it)  # {"image": float32 [B, R, R, 3] in [-1, 1], "caption": str [B], "key": str [B]}
    it.stats()  # {"examples": ..., "skipped/corrupt_image": ..., "converted/cmyk": ..., ...}
    state = it.get_state()  # JSON-able; saved in the trainer's checkpoint
    it.set_state(state)  # resumes with the next unseen example

Stages (each host runs its own copy): this host's part of the source (`sources.make_source`:
disjoint parts, together complete) -> grain's global shuffle, a new order each epoch
(a keyed bijection of indices: no buffer, no memory) -> repeat -> per-example decode,
RGB conversion, resize and crop (`transforms`), each example drawing its randomness from
(seed, host, position in the stream) -> read threads with prefetch -> skip bad examples
and batch -> worker processes.

Bad examples are dropped in the batcher, which fills each batch with the next good ones
and sums the events of every example it consumed into the batch; `DataIterator` pops the
sum and keeps running totals. The counts therefore stay right with any number of worker
processes, and being part of the iterator state, they survive a restart. Because the whole
pipeline is a deterministic function of the stream position, `get_state()` is grain's
position (per worker) and a restored job yields exactly what the interrupted one would
have yielded next.

Pre-encoded sources (`muse-jax preencode`) give instead {"ids_<tokenizer>": int32 [B, h, w]
per tokenizer, "text_emb": bfloat16 [B, T, D], "text_mask": bool [B, T], "text_pooled":
bfloat16 [B, P] when stored, "caption", "key"}.
"""

from collections.abc import Callable, Iterator
import dataclasses
from typing import Any

from absl import flags, logging
import grain
import ml_collections
import numpy as np

from muse_jax.data import sources, transforms
from muse_jax.data.batching import SkipAndBatch
from muse_jax.data.config import default_data_config, expand_short_config
from muse_jax.data.transforms import EVENTS, EVENTS_KEY

STATE_VERSION = 1


__all__ = [
  "DataIterator",
  "default_data_config",
  "expand_short_config",
  "format_stats",
  "image_batches",
  "make_iterator",
  "pre_encoded_batches",
]


def make_transform(
  config: ml_collections.ConfigDict, source: Any
) -> Callable[[dict, np.random.Generator], dict]:
  """The per-example transform for the config's source kind."""
  if config.source == "preencoded":
    length = config.preencoded.text_length or int(source_metadata(source)["text"]["length"])
    return transforms.PreencodedTransform(length, tuple(config.preencoded.features))
  return transforms.ImageTransform(
    resolution=config.resolution,
    crop=config.crop,
    min_image_fraction=config.min_image_fraction,
    max_image_pixels=config.max_image_pixels,
    output=config.output,
    allow_empty_captions=config.allow_empty_captions,
  )


def source_metadata(source: Any) -> dict:
  """The pre-encoding metadata of a (host slice of a) pre-encoded source."""
  return getattr(source, "source", source).metadata


@dataclasses.dataclass(frozen=True)
class _Process:
  """Applies the transform with the example's own generator; never raises."""

  transform: Callable[[dict, np.random.Generator], dict]
  seed: int
  process_index: int

  def __call__(self, index: int, raw: dict) -> dict:
    rng = np.random.default_rng([self.seed, self.process_index, index])
    try:
      return self.transform(raw, rng)
    except Exception as e:  # an unforeseen kind of bad data: skip it, count it, say it
      logging.log_every_n(logging.WARNING, "skipping example %s: %r", 100, raw.get("key"), e)
      return transforms.skipped("unexpected_error")


# ----------------------------------------------------------------------------- the iterator


class DataIterator(Iterator[dict]):
  """Numpy batches with running counts of skipped and converted examples, and a state."""

  def __init__(
    self,
    dataset: grain.IterDataset,
    *,
    fingerprint: dict,
    startup_events: dict[str, int] | None = None,
    postprocess: Callable[[dict], dict] | None = None,
  ):
    self._iterator = iter(dataset)
    self._fingerprint = fingerprint
    self._postprocess = postprocess
    self._counts = np.zeros(len(EVENTS), np.int64)
    for name, n in (startup_events or {}).items():
      self._counts[transforms.EVENT_INDEX[name]] += n
    self._examples = 0

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self._counts += batch.pop(EVENTS_KEY)
    self._examples += len(next(iter(batch.values())))
    return self._postprocess(batch) if self._postprocess else batch

  def stats(self) -> dict[str, int]:
    """Examples yielded and events met so far on this host (cumulative across restarts)."""
    skipped = int(
      sum(n for name, n in zip(EVENTS, self._counts, strict=True) if name.startswith("skipped/"))
    )
    return {
      "examples": self._examples,
      "skipped": skipped,
      **{name: int(n) for name, n in zip(EVENTS, self._counts, strict=True)},
    }

  def get_state(self) -> dict:
    """A JSON-able state: the pipeline's position and the counters."""
    return {
      "version": STATE_VERSION,
      "fingerprint": self._fingerprint,
      "grain": self._iterator.get_state(),
      "examples": self._examples,
      "counts": {name: int(n) for name, n in zip(EVENTS, self._counts, strict=True) if n},
    }

  def set_state(self, state: dict) -> None:
    """Continues from a state of `get_state` (of an iterator built the same way).

    Raises:
      ValueError: the state comes from a differently built pipeline (other source size,
        batch size, seed, host split or number of workers), naming what differs.
    """
    if state.get("version") != STATE_VERSION:
      raise ValueError(
        f"data iterator state version {state.get('version')!r}; expected {STATE_VERSION}"
      )
    theirs = state["fingerprint"]
    differ = {k: (theirs.get(k), v) for k, v in self._fingerprint.items() if theirs.get(k) != v}
    if differ:
      detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
      raise ValueError(f"the saved data state belongs to a different pipeline ({detail})")
    self._iterator.set_state(state["grain"])
    self._examples = int(state["examples"])
    self._counts[:] = 0
    for name, n in state["counts"].items():
      self._counts[transforms.EVENT_INDEX[name]] = n

  def close(self) -> None:
    """Stops worker processes, if any."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "DataIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_stats(stats: dict[str, int]) -> str:
  """One log line of the non-zero counters."""
  return ", ".join(f"{k}={v}" for k, v in stats.items() if v and k != "examples") or "no bad data"


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller does not say

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def make_iterator(
  config: ml_collections.ConfigDict,
  *,
  batch_size: int,
  seed: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  postprocess: Callable[[dict], dict] | None = None,
) -> DataIterator:
  """Builds this host's iterator of numpy batches.

  Args:
    config: the data config (`default_data_config()`, usually `config.data`).
    batch_size: examples per batch on this host (the global batch / process count).
    seed: shuffle and crop seed; default `config.seed`.
    process_index: this host (default `jax.process_index()`; tests simulate hosts).
    process_count: number of hosts (default `jax.process_count()`).
    postprocess: applied to each batch in this process (renaming, reshaping).

  Returns:
    A `DataIterator`; call `close()` when done if it has worker processes.
  """
  process_index, process_count = _hosts(process_index, process_count)
  seed = config.seed if seed is None else seed
  source = sources.make_source(config, process_index=process_index, process_count=process_count)
  ds = grain.MapDataset.source(source)
  if config.shuffle:
    ds = ds.shuffle(seed=seed % 2**32)
  ds = ds.repeat(config.num_epochs)
  ds = ds.map_with_index(_Process(make_transform(config, source), seed, process_index))
  read = grain.ReadOptions(
    num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size
  )
  batches = SkipAndBatch(ds.to_iter_dataset(read), batch_size, config.drop_remainder)
  if config.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # workers read absl flags; a library caller may have none
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(
      num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size
    )
    batches = batches.mp_prefetch(options)
  fingerprint = dict(
    source=config.source,
    examples=len(source),
    batch_size=batch_size,
    seed=seed,
    shuffle=config.shuffle,
    process_index=process_index,
    process_count=process_count,
    num_workers=config.num_workers,
  )
  return DataIterator(
    batches,
    fingerprint=fingerprint,
    startup_events=getattr(source, "startup_events", None),
    postprocess=postprocess,
  )


# ----------------------------------------------------------------------------- for the trainers


def _keep(keys: dict[str, str], flatten: tuple[str, ...] = ()) -> Callable[[dict], dict]:
  """A postprocess that keeps and renames `keys` (old -> new), flattening some to [B, -1]."""

  def select(batch: dict) -> dict:
    out = {new: batch[old] for old, new in keys.items()}
    for key in flatten:
      out[key] = out[key].reshape(len(out[key]), -1)
    return out

  return select


def image_batches(
  config: ml_collections.ConfigDict,
  batch_size: int,
  *,
  seed: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> DataIterator:
  """{"image": uint8 [B, R, R, 3]} for the VQGAN trainer (numeric arrays only).

  Args:
    config: a data config, or its short form (see `expand_short_config`).
    batch_size: examples per batch on this host.
    seed: shuffle and crop seed; default the config's.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).
  """
  config = expand_short_config(config)
  config.output = "uint8"
  return make_iterator(
    config,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    postprocess=_keep({"image": "image"}),
  )


def pre_encoded_batches(
  path: str,
  *,
  batch_size: int,
  ids_key: str,
  low_res_ids_key: str | None = None,
  text_length: int | None = None,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  config: ml_collections.ConfigDict | None = None,
) -> DataIterator:
  """Pre-encoded shards as the transformer trainer reads them.

  Args:
    path: output folder of `muse-jax preencode`.
    batch_size: examples per batch on this host.
    ids_key: feature of the target ids, e.g. "ids_256".
    low_res_ids_key: feature of the low-res ids (super-res), e.g. "ids_256" beside "ids_512".
    text_length: T to pad / cut the text to (default: as pre-encoded).
    seed: shuffle seed.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).
    config: a data config for the other knobs (workers, threads, epochs); default
      `default_data_config()`.

  Returns:
    A `DataIterator` of {"ids": int32 [B, L], "low_res_ids": int32 [B, l] (super-res),
    "text_emb": bfloat16 [B, T, D], "text_mask": bool [B, T], "text_pooled" (if stored)}.
  """
  config = (config or default_data_config()).copy_and_resolve_references()
  config.source = "preencoded"
  config.preencoded.path = path
  config.preencoded.features = tuple(k for k in (ids_key, low_res_ids_key) if k)
  config.preencoded.text_length = text_length or 0
  keys = {ids_key: "ids", "text_emb": "text_emb", "text_mask": "text_mask"}
  if low_res_ids_key:
    keys[low_res_ids_key] = "low_res_ids"
  if read_preencoded_pooled(path):
    keys["text_pooled"] = "text_pooled"
  return make_iterator(
    config,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    postprocess=_keep(keys, flatten=("ids", "low_res_ids") if low_res_ids_key else ("ids",)),
  )


def read_preencoded_pooled(path: str) -> bool:
  """Whether pre-encoded records carry a pooled text embedding."""
  return sources.read_preencoded_metadata(path)["text"].get("pooled_dim") is not None
