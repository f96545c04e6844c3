"""Muse's f=16 VQGAN for 256x256 images: 16x16 tokens, K = 8192 (paper §2.2, App. A.2).

Conv-only encoder/decoder, 2 res blocks per resolution, base 128 channels with multipliers
(1, 1, 2, 2, 4), average-pool downsampling; Adam (0.9, 0.99), lr 1e-4, wd 1e-4, 10k warmup +
cosine, batch 256, perceptual 0.05, adversarial 0.1 (StyleGAN discriminator), R1, LeCAM.

  muse-jax train-vq --config configs/vqgan_f16_256.py --workdir gs://BUCKET/vq_f16 \\
      --config.data.source=tar --config.data.path='gs://BUCKET/shards/{00000..01023}.tar' \\
      --config.loss.perceptual_weights=/path/lpips_vgg16.safetensors
  muse-jax train-vq --config configs/vqgan_f16_256.py:tiny --workdir /tmp/vq_tiny   # CPU
"""

import ml_collections

from muse_jax.trainers.vqgan_config import base_config


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A seconds-long CPU run on the synthetic shapes set (the tests use it)."""
  c.model.update(channels=(16, 16, 32, 32, 32), num_res_blocks=1, latent_channels=16, codebook_size=64,
                 norm_groups=8)  # fmt: skip
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
  c.data.resolution = 256
  if arg == "tiny":
    return tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'tiny'")
  return c
