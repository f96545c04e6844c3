"""Muse's f=8 VQGAN for 512x512 images: 64x64 tokens, K = 8192 (paper §2.2, §2.5, App. A.2).

Base 128 channels with multipliers (1, 2, 2, 4): three halvings. ``:finetune`` is the
paper's decoder finetuning (§2.5): encoder and codebook frozen from a trained f=8 run
(``--config.finetune.checkpoint``), a decoder with 4 res blocks per resolution and base
256 channels trained on the same losses.

  muse-jax train-vq --config configs/vqgan_f8_512.py --workdir gs://BUCKET/vq_f8 \\
      --config.data.source=tar --config.data.path='gs://BUCKET/shards/{00000..01023}.tar'
  muse-jax train-vq --config configs/vqgan_f8_512.py:finetune --workdir gs://BUCKET/vq_f8_ft \\
      --config.finetune.checkpoint=gs://BUCKET/vq_f8
  muse-jax train-vq --config configs/vqgan_f8_512.py:tiny --workdir /tmp/vq8       # CPU
  muse-jax train-vq --config configs/vqgan_f8_512.py:tiny_finetune --workdir /tmp/vq8_ft \\
      --config.finetune.checkpoint=/tmp/vq8
"""

import ml_collections

from muse_jax.trainers.vqgan_config import base_config


def finetune(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.model.update(
    decoder_channels=tuple(2 * ch for ch in c.model.channels), decoder_num_res_blocks=4
  )
  c.finetune.checkpoint = "REQUIRED: --config.finetune.checkpoint=<trained f8 workdir>"
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.model.update(
    channels=(16, 32, 32, 32), num_res_blocks=1, latent_channels=16, codebook_size=64, norm_groups=8
  )
  c.disc.update(channels=(16, 32, 32), stem_channels=8)
  c.data.update(source="shapes", resolution=64)
  c.loss.update(perceptual_weight=0.0, disc_start=10, r1_every=4)
  c.codebook.update(init="kmeans", restart_every=5)
  c.train.update(steps=20, batch_size=8, log_every=5, image_every=10, eval_every=10, eval_batch=4,
                 ckpt_every=10, keep=2)  # fmt: skip
  c.optim.update(lr=1e-3, warmup_steps=5)
  c.disc_optim.update(lr=1e-3, warmup_steps=5)
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(channels=(128, 256, 256, 512))
  c.data.resolution = 512
  c.train.batch_size = 256
  if arg in (None, ""):
    return c
  if arg == "finetune":
    return finetune(c)
  if arg == "tiny":
    return tiny(c)
  if arg == "tiny_finetune":
    c = finetune(tiny(c))
    c.finetune.checkpoint = ""  # set on the command line
    return c
  raise ValueError(
    f"unknown config argument {arg!r}; expected nothing, 'finetune', 'tiny' or 'tiny_finetune'"
  )
