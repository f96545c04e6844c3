"""Checkpoints that survive preemption, and the paper's offline checkpoint averaging.

``Checkpointer`` wraps orbax's ``CheckpointManager``. Each checkpoint is one step
directory holding two items:

* ``state``: the train-state pytree (parameters, optimizer state, step, rng), written
  by every process for the shards it owns and restored straight into sharded
  ``jax.ShapeDtypeStruct`` targets, so a 3B-parameter model is never gathered on one
  device or host;
* ``extras``: a small JSON document (the data iterator's state, anything else a
  trainer needs to continue exactly where it stopped).

The run's config is written once beside the step directories (``config.json``).

Why a kill at any moment is safe: orbax writes each step into
``<step>.orbax-checkpoint-tmp-<time>`` and renames it to ``<step>`` only once every
file is on disk (on object stores, where rename is not atomic, a
``commit_success.txt`` marker plays that role). A half-written step is therefore
never listed as a step; ``cleanup_tmp_directories`` removes such leftovers at the
next start. Saves are asynchronous: the training loop continues while the arrays
(already copied off the device) are written, and ``wait()`` joins before exit.

Averaging (paper §2.6 and Table 6): Muse keeps no online EMA of its weights. It saves
a checkpoint every 5k steps and averages them offline with an exponential moving
average of decay 0.7: ``avg_1 = w_1`` and ``avg_k = 0.7 avg_{k-1} + 0.3 w_k`` in step
order. ``average_checkpoints`` does that leaf-group by leaf-group in float32 on the
host so that memory stays bounded by the averaged tree plus one group.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
import json
import math
import os
import pathlib
from typing import Any, NamedTuple

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE = "state"
EXTRAS = "extras"
CONFIG_FILE = "config.json"
_BYTES_TAG = "__bytes_base64__"


class Restored(NamedTuple):
  """What ``Checkpointer.restore_or_none`` returns."""

  step: int  # The step the checkpoint was saved at.
  state: Any  # The state pytree, shaped and sharded like the abstract target.
  extras: dict[str, Any]  # The JSON extras saved with it ({} if none).


def _encode_json(value: Any) -> Any:
  """Makes ``bytes`` (e.g. grain iterator states) JSON-safe, recursively."""
  if isinstance(value, (bytes, bytearray)):
    return {_BYTES_TAG: base64.b64encode(bytes(value)).decode("ascii")}
  if isinstance(value, Mapping):
    return {str(k): _encode_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_encode_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _decode_json(value: Any) -> Any:
  if isinstance(value, Mapping):
    if set(value) == {_BYTES_TAG}:
      return base64.b64decode(value[_BYTES_TAG])
    return {k: _decode_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode_json(v) for v in value]
  return value


def _restore_args(abstract: Any) -> Any:
  """Orbax restore arguments: sharded arrays where a sharding is given, else numpy."""

  def one(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)

  return jax.tree.map(one, abstract)


class Checkpointer:
  """Saves and restores a train state every N steps; resumes from the latest.

  Typical loop::

    ckpt = Checkpointer(workdir / "checkpoints", save_every=1000, keep=3)
    ckpt.write_config(config)
    restored = ckpt.restore_or_none(abstract_state)
    step, state = (restored.step, restored.state) if restored else (0, init())
    while step < total:
      state = train_step(state, batch); step += 1
      ckpt.save(step, state, {"data": iterator.get_state()})
    ckpt.close()  # waits for the last asynchronous save
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    save_every: int = 1000,
    keep: int | None = 3,
    keep_every: int | None = None,
    async_save: bool = True,
  ):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the step directories live (local path or a ``gs://`` URL).
      save_every: ``save`` writes only at multiples of this (unless forced).
      keep: how many of the newest checkpoints to keep (None: all).
      keep_every: additionally keep every checkpoint whose step is a multiple of
        this forever (e.g. 5000, the paper's averaging interval).
      async_save: write in a background thread while training continues.
    """
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1; got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None; got {keep}")
    if "://" not in os.fspath(directory):  # orbax takes only absolute paths; a URL is one
      directory = os.path.abspath(directory)
    self.directory = directory
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every,
      max_to_keep=keep,
      keep_period=keep_every,
      enable_async_checkpointing=async_save,
      # Half-written steps of a killed run are renamed only when complete, so
      # they are never listed; this deletes them at the next start.
      cleanup_tmp_directories=True,
      create=True,
    )
    handlers = {STATE: ocp.PyTreeCheckpointHandler(), EXTRAS: ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

  # -- queries -----------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` would write (a multiple of ``save_every``, not yet saved)."""
    return step % self.save_every == 0 and step not in self._manager.all_steps()

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster announced a preemption (multi-host jobs); save and exit."""
    return self._manager.reached_preemption(step)

  # -- saving ------------------------------------------------------------------

  def save(
    self, step: int, state: Any, extras: Mapping[str, Any] | None = None, *, force: bool = False
  ) -> bool:
    """Saves ``state`` and ``extras`` at ``step`` if it is due (or ``force``).

    Returns:
      Whether a save was started. With async saving it finishes in the background;
      the arrays are copied off the device before this returns, so ``state`` may be
      donated to the next step immediately.
    """
    if step in self._manager.all_steps() or not (force or step % self.save_every == 0):
      return False
    args = ocp.args.Composite(
      **{
        STATE: ocp.args.PyTreeSave(state),
        EXTRAS: ocp.args.JsonSave(_encode_json(dict(extras or {}))),
      }
    )
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      logging.info("Checkpoint of step %d started in %s.", step, self.directory)
    return saved

  def write_config(self, config: Any) -> None:
    """Writes the run's config as ``config.json`` beside the steps (process 0, atomic)."""
    if jax.process_index() != 0:
      return
    if hasattr(config, "to_json_best_effort"):
      text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
      text = json.dumps(_encode_json(config), indent=2, sort_keys=True, default=repr)
    path = pathlib.Path(os.fspath(self.directory)) / CONFIG_FILE
    if "://" in os.fspath(self.directory):
      epath.Path(self.directory, CONFIG_FILE).write_text(text)
      return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

  def wait(self) -> None:
    """Blocks until the pending asynchronous save (if any) is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- restoring ---------------------------------------------------------------

  def restore_or_none(
    self, abstract_state: Any, *, step: int | None = None, partial: bool = False
  ) -> Restored | None:
    """Restores the latest (or a given) checkpoint into ``abstract_state``'s layout.

    Args:
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding`` for
        arrays to place on devices; leaves without one come back as numpy).
      step: restore this step instead of the latest.
      partial: ``abstract_state`` names only part of the saved tree (e.g.
        ``{"params": ...}`` of a full train state); the rest is not read.

    Returns:
      ``Restored(step, state, extras)``, or None when the directory holds no
      checkpoint yet (a fresh run).
    """
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        return None
    elif step not in self._manager.all_steps():
      raise ValueError(
        f"no checkpoint of step {step} in {self.directory}; found {self.all_steps()}"
      )
    args = ocp.args.Composite(
      **{
        STATE: ocp.args.PyTreeRestore(
          abstract_state, restore_args=_restore_args(abstract_state), partial_restore=partial
        ),
        EXTRAS: ocp.args.JsonRestore(),
      }
    )
    restored = self._manager.restore(step, args=args)
    extras = _decode_json(restored[EXTRAS] or {})
    logging.info("Restored step %d from %s.", step, self.directory)
    return Restored(step=int(step), state=restored[STATE], extras=extras)

  def saved_tree(self, step: int | None = None) -> Any:
    """The saved state's tree of ``ShapeDtypeStruct`` (no arrays read)."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{self.directory} holds no checkpoint")
    metadata = self._manager.item_metadata(step)[STATE]
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
      tree,
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def ema_weights(num: int, decay: float) -> np.ndarray:
  """Weight of each of ``num`` checkpoints (oldest first) in the offline EMA.

  ``avg_1 = w_1, avg_k = decay avg_{k-1} + (1 - decay) w_k`` gives the newest weight
  ``1 - decay``, the one before ``(1 - decay) decay`` and so on, the oldest
  ``decay^(num-1)``; they sum to one.
  """
  if num < 1:
    raise ValueError(f"need at least one checkpoint to average; got {num}")
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1); got {decay}")
  weights = np.array([(1 - decay) * decay ** (num - 1 - i) for i in range(num)])
  weights[0] = decay ** (num - 1)
  return weights


def _leaf_groups(leaves: Sequence[jax.ShapeDtypeStruct], max_bytes: int) -> list[list[int]]:
  groups, current, size = [], [], 0
  for i, leaf in enumerate(leaves):
    nbytes = math.prod(leaf.shape) * 4
    if current and size + nbytes > max_bytes:
      groups.append(current)
      current, size = [], 0
    current.append(i)
    size += nbytes
  if current:
    groups.append(current)
  return groups


def average_checkpoints(
  source: str | os.PathLike,
  destination: str | os.PathLike,
  *,
  decay: float = 0.7,
  every: int = 5000,
  subtree: str = "params",
  first_step: int | None = None,
  last_step: int | None = None,
  max_bytes: int = 2 << 30,
) -> tuple[list[int], int]:
  """The paper's offline checkpoint averaging, into a new checkpoint (§2.6, Table 6).

  Args:
    source: checkpoint directory of a training run.
    destination: new checkpoint directory; receives one step (the newest averaged
      step) whose state is ``{subtree: averaged}``, so it restores like a training
      checkpoint with ``partial=True``, and the run's ``config.json``. Extras record
      the steps and the decay.
    decay: EMA decay over checkpoints in step order (paper: 0.7).
    every: average the checkpoints whose step is a multiple of this (paper: 5000).
    subtree: the top-level key of the saved state to average.
    first_step, last_step: optional inclusive step range.
    max_bytes: float32 bytes of leaves read per checkpoint at a time.

  Returns:
    ``(averaged_steps, destination_step)``.
  """
  src = Checkpointer(source, keep=None, async_save=False)
  steps = [
    s
    for s in src.all_steps()
    if s % every == 0
    and (first_step is None or s >= first_step)
    and (last_step is None or s <= last_step)
  ]
  if not steps:
    raise ValueError(
      f"no checkpoint in {source} at a multiple of every={every} within "
      f"[{first_step}, {last_step}]; found steps {src.all_steps()}"
    )
  saved = src.saved_tree(steps[-1])
  if not isinstance(saved, Mapping) or subtree not in saved:
    keys = list(saved) if isinstance(saved, Mapping) else type(saved).__name__
    raise ValueError(f"saved state of {source} has no top-level {subtree!r}; it has {keys}")
  flat = _flatten_dict(saved[subtree])  # {("layer", "kernel"): ShapeDtypeStruct}
  paths = list(flat)
  weights = ema_weights(len(steps), decay)
  averaged: dict[tuple[str, ...], np.ndarray] = {}
  for group in _leaf_groups([flat[p] for p in paths], max_bytes):
    group_paths = [paths[i] for i in group]
    sums = {p: np.zeros(flat[p].shape, np.float32) for p in group_paths}
    target = {subtree: _unflatten_dict({p: flat[p] for p in group_paths})}
    for step, weight in zip(steps, weights, strict=True):
      got = _flatten_dict(src.restore_or_none(target, step=step, partial=True).state[subtree])
      for p in group_paths:
        sums[p] += weight * np.asarray(got[p], np.float32)
    averaged.update({p: sums[p].astype(flat[p].dtype) for p in group_paths})
  src.close()
  tree = _unflatten_dict(averaged)
  with Checkpointer(destination, keep=None, async_save=False) as dst:
    dst.save(
      steps[-1],
      {subtree: tree},
      {"averaged_steps": steps, "decay": decay, "source": os.fspath(source)},
      force=True,
    )
  # The run's config travels along, so the averaged checkpoint loads like the run's own.
  config_file = epath.Path(source) / CONFIG_FILE
  if config_file.exists() and jax.process_index() == 0:
    (epath.Path(destination) / CONFIG_FILE).write_text(config_file.read_text())
  logging.info(
    "Averaged %d checkpoints (%s) with decay %g into %s.", len(steps), steps, decay, destination
  )
  return steps, steps[-1]


def _flatten_dict(
  tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten_dict(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _unflatten_dict(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
