"""Train a VQGAN image tokenizer (paper §2.2; decoder finetuning §2.5).

Resumes from the workdir's latest checkpoint by itself; TensorBoard logs go to
WORKDIR/tensorboard, checkpoints to WORKDIR/checkpoints.

  muse-jax train-vq --config configs/vqgan_f16_256.py:tiny --workdir /tmp/vq_tiny
  muse-jax train-vq --config configs/vqgan_f8_512.py:finetune --workdir /tmp/vq_f8_ft \\
      --config.finetune.checkpoint=/tmp/vq_f8
"""

from absl import flags
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Folder for checkpoints and TensorBoard logs.", required=True
)
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "VQGAN config file (configs/vqgan_*.py[:arg])."
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  from muse_jax.trainers import vqgan

  vqgan.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
