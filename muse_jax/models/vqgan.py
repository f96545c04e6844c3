"""VQGAN image tokenizer: convolutional encoder, vector quantizer, convolutional decoder.

Muse §2.2 / App. A.2: a fully convolutional VQGAN (no attention), 2 residual blocks per
resolution, base 128 channels, a codebook of K = 8192; f = 16 for 256x256 images (16x16
tokens) and f = 8 for 512x512 (64x64 tokens). §2.5: the decoder is later finetuned with
the encoder and codebook frozen (more blocks, more channels).

The layout follows diffusers' ``VQModel`` (``Encoder`` / ``Decoder`` of
``autoencoders/vae.py``) closely enough that its options express that model exactly, so
aMUSEd's tokenizer weights load (``muse_jax.convert.diffusers_vq``):

  encoder: conv_in 3x3 -> per resolution i: ``num_res_blocks`` ResnetBlocks to
    ``channels[i]`` (+ a downsample except at the last) -> mid block (ResnetBlock,
    [attention], ResnetBlock) -> GroupNorm -> swish -> conv_out 3x3 to ``latent_channels``
  quant_conv 1x1 (optional) -> VectorQuantizer -> post_quant_conv 1x1 (optional)
  decoder: conv_in 3x3 -> mid block -> per resolution, coarse to fine:
    ``decoder_num_res_blocks`` ResnetBlocks (+ nearest x2 upsample and conv 3x3 except at
    the last) -> GroupNorm -> swish -> conv_out 3x3.

An optional patch stem (``patch_size`` p > 1) folds each p x p pixel patch into channels
before the encoder (space-to-depth) and unfolds the decoder's ``p² · out_channels`` outputs
the same way, as ViT-VQGAN's patch embedding and linear pixel head do (Yu et al. 2022,
§3.1): no convolution runs at full resolution, so f = p · 2^(levels-1) costs much less
compute, which is what makes a tokenizer trainable in minutes on a CPU (the demo's).

Downsampling is either a 2x2 average pool (MaskGIT / Muse) or a stride-2 3x3 conv on an
input padded by one pixel at the bottom and right only (diffusers ``Downsample2D`` with
``padding=0``). diffusers' decoder has ``layers_per_block + 1`` blocks per resolution.

The 3x3 stride-1 convs run as XLA's convolutions or, with ``conv_impl="winograd"``, by
Winograd's F(2x2, 3x3) on matrix products (``models/winograd.py``), with the same
parameters; ``vq_convs.fast_convs`` picks the faster for a device (Winograd on a CPU).

Images are NHWC floats in ``input_range`` (MaskGIT/Muse: [-1, 1]; aMUSEd: [0, 1]).
Shapes: B batch, H/W pixels, h/w tokens (H / f), C channels, D code width, K codebook.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.quantizer import VectorQuantizer
from muse_jax.models.subpixel import UpsampleConv
from muse_jax.models.vq_convs import conv_layer
from muse_jax.partitioning import CONV_IN, CONV_OUT, NORM

Array = jax.Array
Dtype = Any


def _norm(groups: int, eps: float, name: str, dtype: Dtype) -> nn.GroupNorm:
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=eps,
    dtype=dtype,
    use_fast_variance=False,  # E[(x-m)²], as torch computes it (parity at 1e-5)
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
    name=name,
  )


class ResnetBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus a 1x1 shortcut
  when the width changes (diffusers ``ResnetBlock2D`` without time embedding)."""

  out_channels: int
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # 3x3 stride-1 convs: one of vq_convs.CONV_IMPLS
  conv_dtype: Dtype | None = None  # winograd and 1x1 convs' product operands; None: dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C']
    conv = functools.partial(
      conv_layer, dtype=self.dtype, conv_impl=self.conv_impl, conv_dtype=self.conv_dtype
    )
    h = nn.silu(_norm(self.norm_groups, self.norm_eps, "norm1", self.dtype)(x))
    h = conv(self.out_channels, 3, "conv1")(h)
    h = nn.silu(_norm(self.norm_groups, self.norm_eps, "norm2", self.dtype)(h))
    h = conv(self.out_channels, 3, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "conv_shortcut")(x)
    return x + h


class Downsample(nn.Module):
  """Halves H and W: 2x2 average pool, or diffusers' stride-2 conv with (0,1) padding."""

  kind: str = "avgpool"  # "avgpool" | "conv"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kind == "avgpool":
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.kind == "conv":
      return conv_layer(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)
    raise ValueError(f"downsample must be 'avgpool' or 'conv'; got {self.kind!r}")


class Upsample(nn.Module):
  """Nearest-neighbour x2 then conv 3x3 (diffusers ``Upsample2D(use_conv=True)``), the
  conv in sub-pixel form (``UpsampleConv``)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return UpsampleConv(x.shape[-1], self.dtype, name="conv")(x)


class SpatialAttention(nn.Module):
  """Single-head self-attention over all positions, with GroupNorm and a residual
  (diffusers ``Attention`` in a VAE mid block: heads = 1, head dim = C)."""

  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = _norm(self.norm_groups, self.norm_eps, "group_norm", self.dtype)(x).reshape(b, hh * ww, c)
    dense = lambda name: nn.Dense(
      c,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (CONV_IN, CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (CONV_OUT,)),
      name=name,
    )
    q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
    logits = jnp.einsum("BLD,BMD->BLM", q, k).astype(jnp.float32) / math.sqrt(c)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = dense("to_out_0")(jnp.einsum("BLM,BMD->BLD", probs, v))
    return x + out.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
  """ResnetBlock, then (optional attention, ResnetBlock) x (num_res_blocks - 1)."""

  channels: int
  num_res_blocks: int = 2
  attention: bool = False
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # 3x3 stride-1 convs: one of vq_convs.CONV_IMPLS
  conv_dtype: Dtype | None = None  # winograd and 1x1 convs' product operands; None: dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype)
    convs = dict(conv_impl=self.conv_impl, conv_dtype=self.conv_dtype)
    x = ResnetBlock(self.channels, **kw, **convs, name="resnets_0")(x)
    for i in range(1, self.num_res_blocks):
      if self.attention:
        x = SpatialAttention(**kw, name=f"attentions_{i - 1}")(x)
      x = ResnetBlock(self.channels, **kw, **convs, name=f"resnets_{i}")(x)
    return x


class Encoder(nn.Module):
  """Images [B, H, W, Cin] -> latents [B, H/f, W/f, latent_channels], f = 2^(levels-1)."""

  channels: tuple[int, ...] = (128, 128, 256, 256, 512)
  num_res_blocks: int = 2
  latent_channels: int = 256
  downsample: str = "avgpool"
  mid_num_res_blocks: int = 2
  mid_attention: bool = False
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # 3x3 stride-1 convs: one of vq_convs.CONV_IMPLS
  conv_dtype: Dtype | None = None  # winograd and 1x1 convs' product operands; None: dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    convs = dict(conv_impl=self.conv_impl, conv_dtype=self.conv_dtype)
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype, **convs)
    x = conv_layer(self.channels[0], 3, "conv_in", self.dtype, **convs)(x.astype(self.dtype))
    for i, c in enumerate(self.channels):
      for j in range(self.num_res_blocks):
        x = ResnetBlock(c, **kw, name=f"down_blocks_{i}_resnets_{j}")(x)
      if i < len(self.channels) - 1:
        x = Downsample(self.downsample, self.dtype, name=f"down_blocks_{i}_downsamplers_0")(x)
    x = MidBlock(
      self.channels[-1], self.mid_num_res_blocks, self.mid_attention, **kw, name="mid_block"
    )(x)
    x = nn.silu(_norm(self.norm_groups, self.norm_eps, "conv_norm_out", self.dtype)(x))
    return conv_layer(self.latent_channels, 3, "conv_out", self.dtype, shard=False, **convs)(x)


class Decoder(nn.Module):
  """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels]."""

  channels: tuple[int, ...] = (128, 128, 256, 256, 512)  # fine to coarse, as the encoder's
  num_res_blocks: int = 2
  out_channels: int = 3
  mid_num_res_blocks: int = 2
  mid_attention: bool = False
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"  # 3x3 stride-1 convs: one of vq_convs.CONV_IMPLS
  conv_dtype: Dtype | None = None  # winograd and 1x1 convs' product operands; None: dtype

  @nn.compact
  def __call__(self, z: Array) -> Array:
    convs = dict(conv_impl=self.conv_impl, conv_dtype=self.conv_dtype)
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype, **convs)
    x = conv_layer(self.channels[-1], 3, "conv_in", self.dtype, **convs)(z.astype(self.dtype))
    x = MidBlock(
      self.channels[-1], self.mid_num_res_blocks, self.mid_attention, **kw, name="mid_block"
    )(x)
    for i, c in enumerate(reversed(self.channels)):
      for j in range(self.num_res_blocks):
        x = ResnetBlock(c, **kw, name=f"up_blocks_{i}_resnets_{j}")(x)
      if i < len(self.channels) - 1:
        x = Upsample(self.dtype, name=f"up_blocks_{i}_upsamplers_0")(x)
    x = nn.silu(_norm(self.norm_groups, self.norm_eps, "conv_norm_out", self.dtype)(x))
    return conv_layer(self.out_channels, 3, "conv_out", self.dtype, shard=False, **convs)(x)


class VQGAN(nn.Module):
  """Encoder -> [quant_conv] -> VectorQuantizer -> [post_quant_conv] -> Decoder.

  ``__call__(images)`` reconstructs; ``encode(images) -> ids [B, h, w]``,
  ``decode(ids) -> images`` and ``decode_codes(z_q) -> images`` serve the other stages.
  """

  channels: tuple[int, ...] = (128, 128, 256, 256, 512)  # per resolution; len - 1 halvings
  num_res_blocks: int = 2  # encoder blocks per resolution (diffusers layers_per_block)
  patch_size: int = 1  # p: pixels folded into channels before the encoder (1: none)
  decoder_channels: tuple[int, ...] | None = None  # default: channels (decoder finetune: wider)
  decoder_num_res_blocks: int | None = None  # default: num_res_blocks (diffusers: +1)
  mid_num_res_blocks: int = 2
  mid_attention: bool = False
  downsample: str = "avgpool"  # "avgpool" (Muse / MaskGIT) | "conv" (diffusers)
  latent_channels: int = 256  # encoder output width
  embed_dim: int | None = None  # code width D; default latent_channels
  use_quant_conv: bool = False  # 1x1 convs around the quantizer (diffusers VQModel: True)
  codebook_size: int = 8192  # K
  beta: float = 0.25
  l2_normalize: bool = False
  codebook_init_scale: float = 1.0
  in_channels: int = 3
  out_channels: int = 3
  norm_groups: int = 32
  norm_eps: float = 1e-6
  input_range: tuple[float, float] = (-1.0, 1.0)  # pixel values the encoder expects
  dtype: Dtype = jnp.float32
  # How the convs compute (same parameters either way): the 3x3 stride-1 ones by XLA or by
  # Winograd (models/winograd.py; faster on a CPU); conv_dtype is the operand dtype of the
  # winograd and 1x1 convs' products, summed in float32 (None: dtype). See vq_convs.
  conv_impl: str = "xla"
  conv_dtype: Dtype | None = None

  @property
  def downsample_factor(self) -> int:
    return self.patch_size * 2 ** (len(self.channels) - 1)

  @property
  def code_dim(self) -> int:
    return self.embed_dim or self.latent_channels

  def setup(self):
    common = dict(
      mid_num_res_blocks=self.mid_num_res_blocks,
      mid_attention=self.mid_attention,
      norm_groups=self.norm_groups,
      norm_eps=self.norm_eps,
      dtype=self.dtype,
      conv_impl=self.conv_impl,
      conv_dtype=self.conv_dtype,
    )
    dec_channels = tuple(self.decoder_channels or self.channels)
    if len(dec_channels) != len(self.channels):
      raise ValueError(
        f"decoder_channels {dec_channels} must have as many resolutions as channels {tuple(self.channels)}"
      )
    for c in (*self.channels, *dec_channels):
      if c % self.norm_groups:
        raise ValueError(f"channel count {c} is not divisible by norm_groups={self.norm_groups}")
    if not self.use_quant_conv and self.code_dim != self.latent_channels:
      raise ValueError(
        f"embed_dim={self.embed_dim} differs from latent_channels={self.latent_channels}: set use_quant_conv=True"
      )
    self.encoder = Encoder(
      tuple(self.channels), self.num_res_blocks, self.latent_channels, self.downsample, **common
    )
    self.decoder = Decoder(
      dec_channels,
      self.decoder_num_res_blocks
      if self.decoder_num_res_blocks is not None
      else self.num_res_blocks,
      self.out_channels * self.patch_size**2,
      **common,
    )
    if self.use_quant_conv:
      pointwise = functools.partial(
        conv_layer, dtype=self.dtype, shard=False, conv_dtype=self.conv_dtype
      )
      self.quant_conv = pointwise(self.code_dim, 1, "quant_conv")
      self.post_quant_conv = pointwise(self.latent_channels, 1, "post_quant_conv")
    self.quantize = VectorQuantizer(
      self.codebook_size, self.code_dim, self.beta, self.l2_normalize, self.codebook_init_scale
    )

  # -- checks --------------------------------------------------------------------------
  def check_images(self, images: Array) -> None:
    """Raises ValueError naming the value found and expected for a bad image batch."""
    f = self.downsample_factor
    if images.ndim != 4:
      raise ValueError(f"images must be [B, H, W, C] (NHWC); got shape {tuple(images.shape)}")
    if images.shape[-1] != self.in_channels:
      raise ValueError(
        f"images have {images.shape[-1]} channels (shape {tuple(images.shape)}); expected {self.in_channels}"
        " (NHWC layout)"
      )
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(
        f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the downsampling factor {f}"
      )
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(
        f"images have dtype {images.dtype}; expected floats in {self.input_range} (convert uint8 with"
        " muse_jax.models.vqgan.uint8_to_range)"
      )

  # -- pieces --------------------------------------------------------------------------
  def encode_latents(self, images: Array) -> Array:
    """Images [B, H, W, C] -> pre-quantization latents [B, h, w, D]."""
    self.check_images(images)
    z = self.encoder(space_to_depth(images, self.patch_size))
    return self.quant_conv(z) if self.use_quant_conv else z

  def quantize_latents(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
    return self.quantize(z)

  def decode_codes(self, z_q: Array) -> Array:
    """Codes [B, h, w, D] -> images [B, H, W, C] (float32)."""
    if self.use_quant_conv:
      z_q = self.post_quant_conv(z_q)
    return depth_to_space(self.decoder(z_q), self.patch_size).astype(jnp.float32)

  # -- public --------------------------------------------------------------------------
  def encode(self, images: Array) -> Array:
    """Images [B, H, W, C] in ``input_range`` -> token ids int32 [B, h, w]."""
    return self.quantize(self.encode_latents(images))[1]

  def decode(self, ids: Array) -> Array:
    """Token ids int [B, h, w] -> images float32 [B, H, W, C] (not clipped)."""
    if ids.ndim != 3:
      raise ValueError(f"ids must be [B, h, w]; got shape {tuple(ids.shape)}")
    return self.decode_codes(self.quantize.lookup(ids).astype(self.dtype))

  def __call__(self, images: Array) -> tuple[Array, dict[str, Array]]:
    """Reconstruction: ``(images_hat [B, H, W, C] float32, aux)``.

    ``aux`` holds the quantizer's losses and statistics, the ids [B, h, w] and the
    pre-quantization latents ``z`` [B, h, w, D] (for codebook restarts).
    """
    z = self.encode_latents(images)
    z_q, ids, aux = self.quantize(z)
    return self.decode_codes(z_q), {**aux, "ids": ids, "z": z}


def space_to_depth(x: Array, p: int) -> Array:
  """[B, H, W, C] -> [B, H/p, W/p, p·p·C]: each p x p patch as one vector (row-major)."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c)
  return jnp.einsum("bhpwqc->bhwpqc", x).reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: Array, p: int) -> Array:
  """Inverse of ``space_to_depth``: [B, h, w, p·p·C] -> [B, h·p, w·p, C]."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p))
  return jnp.einsum("bhwpqc->bhpwqc", x).reshape(b, h * p, w * p, c // (p * p))


def uint8_to_range(images: Array, input_range: tuple[float, float] = (-1.0, 1.0)) -> Array:
  """uint8 [0, 255] -> float32 in ``input_range``."""
  lo, hi = input_range
  return jnp.asarray(images, jnp.float32) * ((hi - lo) / 255.0) + lo


def to_unit_range(x: Array, input_range: tuple[float, float] = (-1.0, 1.0)) -> Array:
  """Model-range pixels -> [0, 1] (clipped)."""
  lo, hi = input_range
  return jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)


def from_unit_range(x: Array, input_range: tuple[float, float] = (-1.0, 1.0)) -> Array:
  """[0, 1] pixels -> model range."""
  lo, hi = input_range
  return x * (hi - lo) + lo
