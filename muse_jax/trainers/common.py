"""Pieces every trainer shares: multi-host start, global batches, metrics, MFU, NaN guard.

* ``maybe_initialize_distributed`` starts ``jax.distributed`` when the environment
  describes a multi-process job (Cloud TPU pod slices, SLURM, Open MPI, or an
  explicit coordinator address); on one host it does nothing.
* ``global_batch`` turns each process's slice of the batch into one global array
  sharded over the mesh's batch axes (``jax.make_array_from_process_local_data``).
* ``gather_process_states`` collects every process's data-iterator state, so that
  the one JSON document the primary process writes into a checkpoint lets each
  process resume its own input stream.
* ``MetricWriter`` logs scalars and images to TensorBoard (tensorboardX, process 0)
  and to the absl log.
* ``StepTimer`` measures step time and derives tokens/s and model FLOPs utilisation.
* ``check_finite`` stops a run on a NaN / Inf loss with a message that says what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import json
import os
import sys
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from muse_jax import partitioning

# Dense bf16 peak FLOP/s per chip, by jax's device_kind. Used when the config gives none.
PEAK_FLOPS = {
  "TPU v2": 45e12,
  "TPU v3": 123e12,
  "TPU v4": 275e12,
  "TPU v4 lite": 137.5e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100 80GB HBM3": 989e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
}

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _wants_distributed() -> bool:
  if any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:  # A multi-host TPU slice lists each worker.
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(key, "1") or 1) > 1:
      return True
  return False


def maybe_initialize_distributed(mode: str = "auto") -> None:
  """Calls ``jax.distributed.initialize()`` when this is a multi-process job.

  Args:
    mode: "auto" (when the environment describes several processes), "on" or "off".
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off'; got {mode!r}")
  if mode == "off" or (mode == "auto" and not _wants_distributed()):
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of the global batch; raises if it does not divide evenly."""
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"global batch {global_batch_size} is not divisible by {jax.process_count()} processes"
    )
  return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each process's numpy batch into global arrays split over (data, fsdp)."""
  return {
    k: jax.make_array_from_process_local_data(partitioning.batch_sharding(mesh, np.ndim(v)), v)
    for k, v in local.items()
  }


def fetch(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (works on multi-host, unlike device_get)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def gather_process_states(state: Any) -> list[Any]:
  """Every process's JSON-serialisable state, in process order, on every process."""
  if jax.process_count() == 1:
    return [state]
  data = np.frombuffer(json.dumps(state, default=_json_bytes).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: data.size] = data
  every = multihost_utils.process_allgather(padded)
  return [
    json.loads(bytes(row[: int(n)]).decode(), object_hook=_json_bytes_hook)
    for row, n in zip(every, np.ravel(lengths), strict=True)
  ]


def _json_bytes(value: Any) -> Any:
  if isinstance(value, (bytes, bytearray)):
    return {"__bytes_latin1__": bytes(value).decode("latin-1")}
  raise TypeError(f"cannot serialise {type(value).__name__} in a data-iterator state")


def _json_bytes_hook(value: dict) -> Any:
  if set(value) == {"__bytes_latin1__"}:
    return value["__bytes_latin1__"].encode("latin-1")
  return value


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch at module level when it is installed, only to accept torch
  tensors; that costs seconds (and torch) in every JAX job. Hiding torch for the import
  makes it fall back to numpy, which is all we pass it.
  """
  hidden = "torch" not in sys.modules
  if hidden:
    sys.modules["torch"] = None  # `import torch` now raises ImportError
  try:
    from tensorboardX import SummaryWriter  # heavy: only process 0 writes
  finally:
    if hidden:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Scalars and images to TensorBoard (process 0 only) and scalars to the log."""

  def __init__(self, logdir: str | os.PathLike | None):
    self._writer = None
    if logdir is not None and jax.process_index() == 0:
      self._writer = _summary_writer_class()(os.fspath(logdir))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    values = {k: float(v) for k, v in values.items()}
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    if self._writer is not None:
      for k, v in values.items():
        self._writer.add_scalar(k, v, step)

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes uint8 or [0, 1] float images [H, W, 3]."""
    if self._writer is None:
      return
    for k, image in images.items():
      self._writer.add_image(k, np.asarray(image), step, dataformats="HWC")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def peak_flops_per_device(configured: float | None = None) -> float | None:
  """The configured peak, else the table's entry for this device kind, else None."""
  if configured:
    return float(configured)
  return PEAK_FLOPS.get(jax.devices()[0].device_kind)


class StepTimer:
  """Wall time per step between log points, and the throughput it implies."""

  def __init__(self, step: int):
    self.reset(step)

  def reset(self, step: int) -> None:
    """Restarts the clock at ``step`` (e.g. after the first step, to leave out compilation)."""
    self._step, self._time = step, time.perf_counter()

  def lap(
    self,
    step: int,
    *,
    tokens_per_step: int,
    flops_per_step: float,
    peak_flops: float | None,
  ) -> dict[str, float]:
    """Metrics for the steps since the previous lap (call after a device sync)."""
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    step_time = (now - self._time) / steps
    self._step, self._time = step, now
    out = {
      "perf/step_time_s": step_time,
      "perf/tokens_per_s": tokens_per_step / step_time,
      "perf/model_tflops_per_device": flops_per_step / step_time / jax.device_count() / 1e12,
    }
    if peak_flops:
      out["perf/mfu"] = flops_per_step / step_time / (peak_flops * jax.device_count())
    return out


class TimeLimit:
  """A run's wall-clock budget, counted from construction (set-up and compilation included).

  Every process gets the same answer (process 0's clock decides), so a multi-host job
  stops at the same step everywhere instead of leaving some hosts in a collective.
  """

  def __init__(self, seconds: float):
    self.seconds = float(seconds or 0.0)
    self._start = time.monotonic()

  def reached(self) -> bool:
    if not self.seconds:
      return False
    over = time.monotonic() - self._start > self.seconds
    if jax.process_count() > 1:
      over = bool(multihost_utils.broadcast_one_to_all(np.asarray(over)))
    return over


def check_finite(step: int, loss: float, *, last_good: int | None, directory: Any) -> None:
  """Raises ``FloatingPointError`` with advice; call when a loss or gradient went non-finite.

  Args:
    step: the step at which it was noticed.
    loss: the latest loss fetched (NaN when unknown). A finite value is not an
      all-clear: callers track non-finite gradients too, and call this when either is bad.
    last_good: the newest checkpoint's step, if any.
    directory: where the checkpoints are.
  """
  where = f"step {last_good} in {directory}" if last_good is not None else "none was saved yet"
  raise FloatingPointError(
    f"training loss or gradients became NaN/Inf (latest loss {loss}) at or before step {step}; "
    f"stopping without saving this state. The last good checkpoint is {where}; restart from it "
    "with a lower learning rate, more warmup or gradient clipping (--config.optim.grad_clip_norm)."
  )


def raise_unless_finite(finite: jax.Array, step: int, loss: float, ckpt: Any) -> None:
  """``check_finite``'s error once ``finite`` (the run's running all-finite flag) is False.

  The last good save completes first; nothing from here on is saved.
  """
  if not bool(fetch(finite)):
    ckpt.wait()
    check_finite(step, loss, last_good=ckpt.latest_step(), directory=ckpt.directory)


def save_or_stop(
  ckpt: Any,
  step: int,
  state: Any,
  extras: Callable[[], dict],
  *,
  must_save: bool,
  out_of_time: bool,
  time_limit_s: float,
) -> bool:
  """A train loop's end of step: saves when due or when a preemption is announced.

  Args:
    ckpt: the run's ``checkpointing.Checkpointer``.
    step: the step just taken.
    state: the train state after it.
    extras: makes the JSON extras saved beside it (the data iterators' states); called
      only when saving, as gathering them is a collective on a multi-host run.
    must_save: a save is due (the schedule, the last step, or the time limit).
    out_of_time: the run's ``TimeLimit`` was reached.
    time_limit_s: that limit, for the log line.

  Returns:
    True when the loop must stop: a preemption was announced, or the time is up (the
    state is then saved).
  """
  preempted = ckpt.reached_preemption(step)
  if must_save or preempted:
    ckpt.save(step, state, extras(), force=True)
  if preempted:
    logging.warning("Preemption announced: saved step %d, exiting.", step)
  elif out_of_time:
    logging.warning("train.time_limit_s=%g reached: saved step %d, stopping.", time_limit_s, step)
  return preempted or out_of_time
