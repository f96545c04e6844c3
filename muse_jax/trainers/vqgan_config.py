"""The VQGAN trainer's config, and the models it describes.

``base_config()`` holds every knob of ``trainers.vqgan`` with the paper's values where it
gives them (§2.2, App. A.2); ``configs/vqgan_*.py`` override it. ``make_model`` and
``make_discriminator`` build the modules from its ``model`` and ``disc`` sections, for the
trainer and for everything that reads a trained tokenizer (``muse_jax.vq_tokenizer``).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from muse_jax.data.config import default_data_config
from muse_jax.models.discriminator import StyleGANDiscriminator
from muse_jax.models.vqgan import VQGAN


def base_config() -> ml_collections.ConfigDict:
  """Every knob with the paper's values where it gives them; configs/ override it."""
  c = ml_collections.ConfigDict()
  c.model = dict(
    channels=(128, 128, 256, 256, 512),  # base 128 x (1, 1, 2, 2, 4): f = 16
    num_res_blocks=2,  # paper: 2 res blocks per resolution
    patch_size=1,  # > 1: a space-to-depth stem (ViT-VQGAN style; the CPU demo's)
    decoder_channels=(),  # () = channels; decoder finetune: (256, 256, 512, 512, 1024)
    decoder_num_res_blocks=0,  # 0 = num_res_blocks; decoder finetune: 4
    mid_num_res_blocks=2,
    mid_attention=False,  # paper: conv only
    downsample="avgpool",
    latent_channels=256,
    embed_dim=0,  # 0 = latent_channels
    use_quant_conv=False,
    codebook_size=8192,
    beta=0.25,
    l2_normalize=False,
    codebook_init_scale=1.0,
    norm_groups=32,
    input_range=(-1.0, 1.0),
    dtype="float32",
  )
  c.disc = dict(
    channels=(128, 256, 512, 512, 512, 512), stem_channels=64, mbstd_group=4, dtype="float32"
  )
  c.loss = dict(
    reconstruction="l1",
    reconstruction_weight=1.0,
    quantizer_weight=1.0,
    perceptual_weight=0.05,  # paper
    perceptual_weights="",  # local LPIPS/VGG16 safetensors; absent -> the loss is off
    adversarial="hinge",  # or "non_saturating"
    adversarial_weight=0.1,  # paper
    disc_start=20_000,  # steps before the GAN terms switch on (our choice)
    r1_gamma=10.0,
    r1_every=16,  # lazy R1
    lecam_weight=0.001,
    lecam_decay=0.999,
  )
  c.codebook = dict(
    init="random",  # or "kmeans" (on the first batch's latents)
    restart_every=0,  # steps between dead-code restarts (0: never)
    dead_fraction=0.03,  # dead: hit less than this fraction of the uniform rate
    usage_decay=0.99,
    restart_noise=0.0,
  )
  c.finetune = dict(
    checkpoint="",  # trained tokenizer (workdir / diffusers folder): encoder + codebook frozen
    copy_decoder=False,  # also start the decoder from it (same decoder shape) instead of afresh
    # Probability that a token the decoder sees is swapped for one of its `noise_neighbours`
    # nearest codes (the target stays the clean image): robustness to sampled tokens.
    code_noise=0.0,
    noise_neighbours=8,
  )
  c.data = default_data_config()  # folder / tar / tfds / synthetic "shapes"
  c.data.output = "uint8"  # the step maps uint8 to the model's range on the device
  c.data.resolution = 256
  c.train = dict(
    steps=500_000,
    batch_size=256,  # paper
    seed=0,
    ema_decay=0.999,
    log_every=100,
    image_every=5000,  # reconstruction grids in TensorBoard (0: never)
    eval_every=5000,  # PSNR / usage of the EMA params on a held batch (0: never)
    eval_batch=16,
    ckpt_every=5000,
    keep=3,
    async_checkpoints=True,
    distributed="auto",
    time_limit_s=0.0,  # stop (saving a checkpoint) this long after the call began (0: no limit)
  )
  # Adam (0.9, 0.99), lr 1e-4, wd 1e-4, 10k warmup, cosine (paper App. A.2).
  c.optim = dict(
      name="adamw", lr=1e-4, warmup_steps=10_000, schedule="cosine", end_lr_factor=0.0,
      b1=0.9, b2=0.99, weight_decay=1e-4, grad_clip_norm=0.0, eps=1e-8,
  )  # fmt: skip
  c.disc_optim = c.optim.copy_and_resolve_references()
  c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), num_devices=0, rules=None)
  return c


def make_model(m: ml_collections.ConfigDict) -> VQGAN:
  return VQGAN(
    channels=tuple(m.channels),
    num_res_blocks=m.num_res_blocks,
    patch_size=m.get("patch_size", 1),
    decoder_channels=tuple(m.decoder_channels) or None,
    decoder_num_res_blocks=m.decoder_num_res_blocks or None,
    mid_num_res_blocks=m.mid_num_res_blocks,
    mid_attention=m.mid_attention,
    downsample=m.downsample,
    latent_channels=m.latent_channels,
    embed_dim=m.embed_dim or None,
    use_quant_conv=m.use_quant_conv,
    codebook_size=m.codebook_size,
    beta=m.beta,
    l2_normalize=m.l2_normalize,
    codebook_init_scale=m.codebook_init_scale,
    norm_groups=m.norm_groups,
    input_range=tuple(float(v) for v in m.input_range),
    dtype=jnp.dtype(m.dtype),
  )


def make_discriminator(d: ml_collections.ConfigDict) -> StyleGANDiscriminator:
  return StyleGANDiscriminator(
    channels=tuple(d.channels),
    stem_channels=d.stem_channels,
    mbstd_group=d.mbstd_group,
    dtype=jnp.dtype(d.dtype),
  )
