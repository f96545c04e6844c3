"""Batching that drops skipped examples and carries the events of every consumed one.

`SkipAndBatch` fills each batch with the next good examples, so batches keep their size
however much bad data there is, and sums the events (skip reasons, conversions) of every
example it consumed into the batch's count vector. Since the counts travel inside the
batches, they add up correctly whatever the number of worker processes, each of which
runs its own batcher; the consumer pops them (`pipeline.DataIterator`).
"""

import grain
import numpy as np

from muse_jax.data.transforms import EVENTS, EVENTS_KEY, SKIP


def collate(examples: list[dict]) -> dict:
  """Stacks examples: arrays along a new axis, strings into object arrays."""
  out = {}
  for key, value in examples[0].items():
    if key == EVENTS_KEY:
      continue
    values = [e[key] for e in examples]
    out[key] = np.array(values, dtype=object) if isinstance(value, str) else np.stack(values)
  return out


class _SkipAndBatchIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool):
    super().__init__(parent)
    self._batch_size, self._drop_remainder = batch_size, drop_remainder

  def __next__(self) -> dict:
    examples, events = [], []
    while len(examples) < self._batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        if self._drop_remainder or not examples:
          raise
        break
      events.extend(example[EVENTS_KEY])
      if SKIP not in example:
        examples.append(example)
    batch = collate(examples)
    batch[EVENTS_KEY] = np.bincount(np.asarray(events, np.int64), minlength=len(EVENTS))
    return batch

  # A batch is complete when yielded, so the position of the parent is the whole state.
  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


class SkipAndBatch(grain.IterDataset):
  """Drops skipped examples, batches the rest, and sums every consumed example's events."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool = True):
    super().__init__(parent)
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive; got {batch_size}")
    self._batch_size, self._drop_remainder = batch_size, drop_remainder

  def __iter__(self) -> _SkipAndBatchIterator:
    return _SkipAndBatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder)
