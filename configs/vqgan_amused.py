"""aMUSEd's tokenizer (diffusers ``VQModel`` of amused-256/512) as a trainable config.

The architecture is exactly what ``muse_jax.convert.diffusers_vq`` loads aMUSEd's weights
into: channels (128, 256, 256, 512, 768), 2 res blocks per encoder resolution and 3 per
decoder resolution, stride-2 conv downsampling padded (0, 1), mid block without
attention, latent 64 with 1x1 quant_conv / post_quant_conv, K = 8192, images in [0, 1].
Use it to train a compatible tokenizer from scratch, or to finetune aMUSEd's decoder:

  muse-jax train-vq --config configs/vqgan_amused.py:finetune --workdir /tmp/amused_dec \\
      --config.finetune.checkpoint=/path/amused-256   # pipeline folder (uses vqvae/)
  muse-jax reconstruct --checkpoint /path/amused-256 --images photos/ --out /tmp/recon
"""

import ml_collections

from muse_jax.trainers.vqgan_config import base_config

AMUSED_MODEL = dict(
  channels=(128, 256, 256, 512, 768),
  num_res_blocks=2,
  decoder_channels=(),
  decoder_num_res_blocks=3,
  mid_num_res_blocks=2,
  mid_attention=False,
  downsample="conv",
  latent_channels=64,
  embed_dim=64,
  use_quant_conv=True,
  codebook_size=8192,
  l2_normalize=False,
  norm_groups=32,
  input_range=(0.0, 1.0),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(**AMUSED_MODEL)
  c.data.resolution = 256
  if arg in (None, ""):
    return c
  if arg == "finetune":
    c.finetune.checkpoint = (
      "REQUIRED: --config.finetune.checkpoint=<aMUSEd folder or train-vq workdir>"
    )
    c.finetune.copy_decoder = True  # same decoder shape: continue from aMUSEd's decoder
    return c
  if arg == "tiny":
    c.model.update(channels=(16, 32, 32, 32, 32), num_res_blocks=1, decoder_num_res_blocks=2, latent_channels=8,
                   embed_dim=8, codebook_size=64, norm_groups=8)  # fmt: skip
    c.disc.update(channels=(16, 32, 32), stem_channels=8)
    c.data.update(source="shapes", resolution=64)
    c.loss.update(perceptual_weight=0.0, disc_start=10, r1_every=4)
    c.train.update(steps=20, batch_size=8, log_every=5, image_every=10, eval_every=10, eval_batch=4,
                   ckpt_every=10, keep=2)  # fmt: skip
    c.optim.update(lr=1e-3, warmup_steps=5)
    c.disc_optim.update(lr=1e-3, warmup_steps=5)
    return c
  raise ValueError(f"unknown config argument {arg!r}; expected nothing, 'finetune' or 'tiny'")
