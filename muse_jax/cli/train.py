r"""Train a Muse transformer (base or super-resolution), resuming from WORKDIR if it holds checkpoints.

  muse-jax train --config configs/muse_base_632m.py:tiny --workdir /tmp/muse_tiny
  muse-jax train --config configs/muse_base_3b.py --workdir gs://BUCKET/muse_3b \
      --config.data.source=pre_encoded --config.data.path=gs://BUCKET/shards

Every config field can be overridden as --config.section.field=value. On a TPU pod run
the same command on every host; jax.distributed starts by itself (--config.train.distributed).
Checkpoints go to WORKDIR/checkpoints, TensorBoard events to WORKDIR/tensorboard.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Trainer config file, e.g. configs/muse_base_632m.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Checkpoints and TensorBoard events (local or gs://)."
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/muse_base_632m.py:tiny")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # grain's worker processes read absl flags; they must look parsed to them.
  flags.FLAGS.mark_as_parsed()
  from muse_jax.trainers import transformer

  logging.set_verbosity(logging.INFO)
  try:
    transformer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (FloatingPointError, ValueError) as e:
    # Bad settings (a batch that does not split over the mesh, an unknown optimizer, ...)
    # and a diverged run are the user's to fix: one line, the traceback only at -v 1.
    logging.debug("muse-jax train failed", exc_info=True)
    raise SystemExit(f"muse-jax train: {e}") from None
