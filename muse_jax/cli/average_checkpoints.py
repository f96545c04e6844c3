r"""Average a run's checkpoints offline into a new checkpoint (Muse §2.6, Table 6).

Muse keeps no online EMA: it saves every 5k steps and averages those checkpoints with an
exponential moving average of decay 0.7, oldest to newest. The result holds only the
parameters ({"params": ...}) at the newest averaged step; the sampler and the pipeline
load it like a training checkpoint.

  muse-jax average-checkpoints --source /tmp/muse/checkpoints --destination /tmp/muse/averaged
  muse-jax average-checkpoints --source gs://B/run/checkpoints --destination gs://B/run/avg \
      --every 5000 --decay 0.7 --first_step 900000
"""

from absl import app, flags, logging

_SOURCE = flags.DEFINE_string("source", None, "Checkpoint directory of a training run.")
_DESTINATION = flags.DEFINE_string("destination", None, "New checkpoint directory to write.")
_DECAY = flags.DEFINE_float("decay", 0.7, "EMA decay over checkpoints in step order (paper: 0.7).")
_EVERY = flags.DEFINE_integer("every", 5000, "Average checkpoints at multiples of this step.")
_FIRST = flags.DEFINE_integer("first_step", None, "Ignore checkpoints before this step.")
_LAST = flags.DEFINE_integer("last_step", None, "Ignore checkpoints after this step.")
_SUBTREE = flags.DEFINE_string("subtree", "params", "Top-level key of the saved state to average.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  if not _SOURCE.value or not _DESTINATION.value:
    raise app.UsageError("--source and --destination are both required")
  if _SOURCE.value.rstrip("/") == _DESTINATION.value.rstrip("/"):
    raise app.UsageError("--destination must differ from --source")
  from muse_jax import checkpointing

  try:
    steps, out = checkpointing.average_checkpoints(
      _SOURCE.value,
      _DESTINATION.value,
      decay=_DECAY.value,
      every=_EVERY.value,
      subtree=_SUBTREE.value,
      first_step=_FIRST.value,
      last_step=_LAST.value,
    )
  except ValueError as e:
    raise SystemExit(f"muse-jax average-checkpoints: {e}") from None
  logging.info("Averaged steps %s into %s (step %d).", steps, _DESTINATION.value, out)
  print(
    f"averaged {len(steps)} checkpoints (steps {steps[0]}..{steps[-1]}) into {_DESTINATION.value} at step {out}"
  )
