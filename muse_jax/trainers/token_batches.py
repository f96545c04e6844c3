"""Batches for the transformer trainer: pre-encoded shards, or a synthetic token task.

A batch is a dict of host-local numpy arrays (this process's share of the global
batch)::

  ids          int32 [b, L]      target image-token ids in [0, K)
  low_res_ids  int32 [b, l]      (super-res only) the low-res tokenizer's ids
  text_emb     float [b, T, Dt]  frozen text-encoder outputs
  text_mask    bool  [b, T]      True at real (non-padding) text tokens

``source="pre_encoded"`` reads the ArrayRecord shards ``muse-jax preencode`` writes,
through ``muse_jax.data``'s grain pipeline (the iterator state is grain's; resuming
continues with the next unseen example).

``source="synthetic"`` needs no data, VQ model or text encoder: a small, learnable,
text-conditioned token task for smoke tests, CPU runs and the trainer's tests. It is
not images. There are C classes; class c has a fixed random "caption" (a random
number of random Dt-dim vectors, then padding) and a fixed token map made of a few
random rectangles of random codes on a background code. An example is a class's
map with a fraction of its tokens replaced by random codes, paired with its
caption; a model must read the text to predict the tokens. For super-resolution
the low-res map is the class map at the low-res grid, and the high-res ids are a
fixed function of it (each low-res code expands into a fixed s x s patch of codes),
so the super-res model must read the low-res ids. Every batch is a pure function of
(seed, process, batch index), so the iterator's state is one integer and a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from typing import Any

from etils import epath
import jax
import numpy as np


class SyntheticTokens:
  """The synthetic token task as an iterator with ``get_state`` / ``set_state``."""

  def __init__(
    self,
    *,
    batch_size: int,
    vocab_size: int,
    grid: tuple[int, int],
    text_length: int,
    text_dim: int,
    low_grid: tuple[int, int] | None = None,
    low_vocab_size: int | None = None,
    num_classes: int = 16,
    noise: float = 0.1,
    fixed_batch: bool = False,
    seed: int = 0,
    process_index: int | None = None,
  ):
    """Builds the class tables.

    Args:
      batch_size: examples per batch (this process's share).
      vocab_size: K of the target ids.
      grid: (h, w) of the target ids.
      text_length: T.
      text_dim: Dt.
      low_grid: (h, w) of the low-res ids (super-res only); must divide ``grid``.
      low_vocab_size: K of the low-res ids (super-res only).
      num_classes: C.
      noise: fraction of target tokens replaced by random codes per example.
      fixed_batch: yield the same batch forever (for overfitting tests).
      seed: the task's seed (tables are shared by all processes).
      process_index: which process's stream (default: this process).
    """
    self.batch_size = batch_size
    self.vocab_size = vocab_size
    self.grid = tuple(grid)
    self.low_grid = tuple(low_grid) if low_grid else None
    self.noise = noise
    self.fixed_batch = fixed_batch
    self.seed = seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.index = 0
    rng = np.random.default_rng([seed, 0])
    lengths = rng.integers(1, text_length + 1, num_classes)
    self.text_mask = np.arange(text_length)[None, :] < lengths[:, None]  # [C, T]
    emb = rng.normal(size=(num_classes, text_length, text_dim)).astype(np.float32)
    self.text_emb = np.where(self.text_mask[..., None], emb, 0.0).astype(np.float32)
    if self.low_grid is None:
      self.maps = _class_maps(rng, num_classes, self.grid, vocab_size)  # [C, L]
      self.low_maps = None
    else:
      gh, gw = self.grid
      lh, lw = self.low_grid
      if gh % lh or gw % lw or gh // lh != gw // lw:
        raise ValueError(f"low-res grid {self.low_grid} must divide the grid {self.grid} evenly")
      s = gh // lh
      self.low_maps = _class_maps(rng, num_classes, self.low_grid, low_vocab_size)  # [C, l]
      # Each low-res code expands into a fixed s x s patch of high-res codes.
      expand = rng.integers(0, vocab_size, (low_vocab_size, s, s))
      low = self.low_maps.reshape(num_classes, lh, lw)
      high = expand[low]  # [C, lh, lw, s, s]
      self.maps = high.transpose(0, 1, 3, 2, 4).reshape(num_classes, gh * gw)

  def get_state(self) -> dict[str, int]:
    return {"index": self.index}

  def set_state(self, state: dict[str, Any]) -> None:
    self.index = int(state["index"])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    index = 0 if self.fixed_batch else self.index
    rng = np.random.default_rng([self.seed, 1, self.process_index, index])
    self.index += 1
    classes = rng.integers(0, len(self.maps), self.batch_size)
    ids = self.maps[classes].copy()
    replace = rng.random(ids.shape) < self.noise
    ids[replace] = rng.integers(0, self.vocab_size, int(replace.sum()))
    batch = {
      "ids": ids.astype(np.int32),
      "text_emb": self.text_emb[classes],
      "text_mask": self.text_mask[classes],
    }
    if self.low_maps is not None:
      batch["low_res_ids"] = self.low_maps[classes].astype(np.int32)
    return batch


def _class_maps(
  rng: np.random.Generator, num: int, grid: tuple[int, int], vocab: int
) -> np.ndarray:
  """Per class: a background code and 3 random rectangles of random codes; [C, h*w]."""
  h, w = grid
  maps = np.repeat(rng.integers(0, vocab, (num, 1, 1)), h, 1).repeat(w, 2)
  for c in range(num):
    for _ in range(3):
      top, left = rng.integers(0, h), rng.integers(0, w)
      bottom, right = rng.integers(top + 1, h + 1), rng.integers(left + 1, w + 1)
      maps[c, top:bottom, left:right] = rng.integers(0, vocab)
  return maps.reshape(num, h * w)


def make_batches(config: Any, *, local_batch: int, superres: bool) -> Any:
  """The iterator the trainer reads, from the ``data`` section of its config.

  Args:
    config: the full trainer config (reads ``data``, ``model`` and ``text``).
    local_batch: this process's examples per batch.
    superres: whether batches need ``low_res_ids``.

  Returns:
    An iterator of batch dicts with ``get_state()`` / ``set_state(state)``.
  """
  data, model = config.data, config.model
  if data.source == "synthetic":
    return SyntheticTokens(
      batch_size=local_batch,
      vocab_size=model.vocab_size,
      grid=tuple(model.grid),
      text_length=config.text.length,
      text_dim=config.text.dim,
      low_grid=tuple(model.low_grid) if superres else None,
      low_vocab_size=model.low_vocab_size if superres else None,
      num_classes=data.num_classes,
      noise=data.noise,
      fixed_batch=data.fixed_batch,
      seed=data.seed,
    )
  if data.source == "pre_encoded":
    return _pre_encoded(config, local_batch=local_batch, superres=superres)
  raise ValueError(f"unknown data source {data.source!r}; expected 'synthetic' or 'pre_encoded'")


def _pre_encoded(config: Any, *, local_batch: int, superres: bool) -> Any:
  """The pre-encoded shards through ``muse_jax.data``'s grain pipeline."""
  from muse_jax.data import pipeline

  data = config.data
  if not data.path:
    raise ValueError("data.source='pre_encoded' needs data.path (the output of muse-jax preencode)")
  if superres and not data.low_res_ids_key:
    raise ValueError("the super-res model needs data.low_res_ids_key (e.g. 'ids_256')")
  reader = pipeline.default_data_config()
  reader.num_workers = data.num_workers
  reader.num_threads = data.num_threads
  return pipeline.pre_encoded_batches(
    data.path,
    batch_size=local_batch,
    ids_key=data.ids_key,
    low_res_ids_key=data.low_res_ids_key if superres else None,
    text_length=config.text.length,
    seed=data.seed,
    config=reader,
  )


def unconditional_text(config: Any) -> tuple[np.ndarray, np.ndarray]:
  """The "no text" conditioning used for classifier-free guidance dropout.

  ``data.uncond_path`` (default: ``uncond.npz`` beside pre-encoded shards): an
  ``.npz`` with ``text_emb`` [T', Dt] and ``text_mask`` [T'], the frozen encoder's
  output for the empty prompt, padded or cut to T; otherwise zeros with an
  all-False mask, which the model sees as "no
  text" (its cross-attention then averages the projected padding uniformly).
  The sampler must use the same conditioning for its unconditional rows.
  """
  t, dt = config.text.length, config.text.dim
  path = config.data.get("uncond_path", "")
  if not path and config.data.source == "pre_encoded":
    from muse_jax.data.preencode import UNCOND_FILE

    candidate = epath.Path(config.data.path) / UNCOND_FILE
    path = os.fspath(candidate) if candidate.exists() else ""
  if not path:
    return np.zeros((t, dt), np.float32), np.zeros((t,), bool)
  with epath.Path(path).open("rb") as f, np.load(f) as z:
    emb, mask = np.asarray(z["text_emb"], np.float32), np.asarray(z["text_mask"], bool)
  if emb.ndim != 2 or emb.shape[1] != dt or mask.shape != emb.shape[:1]:
    raise ValueError(
      f"unconditional embedding in {path} has shapes {emb.shape}, {mask.shape}; the config "
      f"expects text_emb [T, {dt}] and text_mask [T]"
    )
  # Pad or cut to T, as the pipeline does with every caption.
  n = min(len(mask), t)
  out_emb, out_mask = np.zeros((t, dt), np.float32), np.zeros((t,), bool)
  out_emb[:n], out_mask[:n] = emb[:n], mask[:n]
  return out_emb, out_mask
