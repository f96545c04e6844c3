"""Building blocks of the aMUSEd U-ViT (``uvit.py``), numerically equal to diffusers'.

Each block reproduces one diffusers module of ``UVit2DModel`` (named in its
docstring) with the same arithmetic, but channels-last throughout, so that the
permutes of the PyTorch code disappear: a feature map is ``[B, Y, X, C]`` and its
token view ``[B, L, C]`` (``L = Y * X``) is a free reshape. Projections that
diffusers keeps separate but applies to the same input are fused into one einsum
(query/key/value of self-attention, key/value of cross-attention, the two halves
of the GEGLU input projection, scale/shift of each modulation).

Norms, softmax and GELU are computed in float32 whatever ``dtype`` is; matmuls
multiply in ``dtype`` and accumulate in float32. With bfloat16 that halves memory
traffic on accelerators and doubles the matmul rate on CPUs with AVX512-BF16 (the
U-ViT runs ~1.7x faster on this project's 2-core Zen 4 machine).

Sharding: only head and MLP axes go to ``tensor``; a kernel whose output is a model
width (D or C) shards its input axis only (EMBED -> ``fsdp``). Sharding such an
output over ``tensor`` (e.g. the modulations) made XLA's SPMD partitioner (jax
0.10.2, GSPMD and Shardy alike) return wrong numbers; tests/test_uvit.py keeps a
minimal reproduction (``test_xla_spmd_miscompile_reproduction``).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from muse_jax.models.layers import depthwise_conv3x3, dot_product_attention
from muse_jax.partitioning import EMBED, HEAD_DIM, HEADS, MLP, NORM

Dtype = Any
Initializer = Callable[..., jax.Array]


def timestep_embedding(values: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of scalars, cosines first (diffusers ``get_timestep_embedding``).

  Matches ``flip_sin_to_cos=True, downscale_freq_shift=0``: frequencies
  ``exp(-log(max_period) * i / (dim / 2))`` for ``i < dim / 2``.

  Args:
    values: float array of any shape ``[...]``.
    dim: number of features per value (even).

  Returns:
    float32 ``[..., dim]``: ``cos(v * f)`` then ``sin(v * f)``.
  """
  if dim % 2:
    raise ValueError(f"sinusoidal embedding width must be even; got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = values.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class Dense(nn.Module):
  """A bias-optional linear map contracting the last ``contract`` axes of its input.

  The kernel is ``[*in_dims, *features]`` so fused projections keep their structure
  (e.g. ``[D, 3, N, H]`` for query/key/value) and every axis has a logical name.
  """

  features: tuple[int, ...] = ()  # output dims appended after the input's batch dims
  axes: tuple[str | None, ...] = ()  # logical names of the kernel dims (contracted, then output)
  contract: int = 1  # how many trailing input axes are contracted
  use_bias: bool = False  # add a bias of shape `features`
  dtype: Dtype = jnp.float32  # computation dtype (of the inputs of the dot)
  param_dtype: Dtype = jnp.float32  # parameter dtype
  out_dtype: Dtype | None = None  # output dtype; None: `dtype`

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    nc = self.contract
    shape = (*x.shape[x.ndim - nc :], *self.features)
    if len(self.axes) != len(shape):
      raise ValueError(f"{self.name}: {len(self.axes)} axis names for a kernel of shape {shape}")
    init = nn.initializers.variance_scaling(
      1.0,
      "fan_in",
      "truncated_normal",
      in_axis=tuple(range(nc)),
      out_axis=tuple(range(nc, len(shape))),
    )
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, self.axes), shape, self.param_dtype
    )
    dims = ((tuple(range(x.ndim - nc, x.ndim)), tuple(range(nc))), ((), ()))
    # Products in `dtype`, sums in float32: with bfloat16 this is the TPU's native
    # matmul, and XLA's CPU backend runs it on AVX512-BF16 at twice the float32 rate
    # (a bfloat16 *output* would send it down a path no faster than float32).
    out_dtype = self.out_dtype or self.dtype
    y = lax.dot_general(
      x.astype(self.dtype), kernel.astype(self.dtype), dims, preferred_element_type=jnp.float32
    )
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.axes[nc:]),
        self.features,
        self.param_dtype,
      )
      y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (diffusers ``RMSNorm``)."""

  eps: float = 1e-6  # added to the mean square
  use_scale: bool = True  # learnable per-channel scale (diffusers `elementwise_affine`)
  dtype: Dtype = jnp.float32  # output dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
        (x.shape[-1],),
        self.param_dtype,
      )
      y = y * scale.astype(jnp.float32)
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """Layer normalisation with optional scale and bias (torch ``nn.LayerNorm``)."""

  eps: float = 1e-6  # added to the variance
  use_scale: bool = True  # learnable per-channel scale
  use_bias: bool = False  # learnable per-channel bias (only with use_scale, as in torch)
  dtype: Dtype = jnp.float32  # output dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    y = centred * lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
    features = (x.shape[-1],)
    if self.use_scale:
      y = y * self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
        features,
        self.param_dtype,
      )
      if self.use_bias:
        y = y + self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
          features,
          self.param_dtype,
        )
    return y.astype(self.dtype)


class AdaNorm(nn.Module):
  """Norm, then scale and shift predicted from a conditioning vector (AdaLN).

  diffusers ``AdaLayerNormContinuous``: ``norm(x) * (1 + scale) + shift`` with
  ``(scale, shift) = W silu(cond)``. The norm keeps its own affine weight when
  ``use_scale`` (aMUSEd has both; they are not redundant only in name).
  """

  kind: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm)
  eps: float = 1e-6  # norm epsilon
  use_scale: bool = True  # the norm's own elementwise weight
  use_bias: bool = False  # bias of the modulation projection (and of a LayerNorm)
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """x: [B, L, D]; cond: [B, Dc] -> [B, L, D]."""
    width = x.shape[-1]
    modulation = Dense(
      (2, width),
      (EMBED, None, None),
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="modulation",
    )(nn.silu(cond))  # [B, 2, D]: scale, shift
    if self.kind == "rms":
      norm = RMSNorm(self.eps, self.use_scale, jnp.float32, self.param_dtype, name="norm")
    elif self.kind == "layer":
      norm = LayerNorm(
        self.eps, self.use_scale, self.use_bias, jnp.float32, self.param_dtype, name="norm"
      )
    else:
      raise ValueError(f"AdaNorm kind must be 'rms' or 'layer'; got {self.kind!r}")
    modulation = modulation.astype(jnp.float32)[:, None]  # [B, 1, 2, D]
    y = norm(x) * (1.0 + modulation[..., 0, :]) + modulation[..., 1, :]
    return y.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head attention without masks (diffusers ``Attention`` + ``AttnProcessor2_0``).

  Self-attention when ``context`` is None (one fused ``[D, 3, N, H]`` projection),
  otherwise cross-attention to ``context`` (query ``[D, N, H]``, fused key/value
  ``[Dc, 2, N, H]``). Output projection back to the query width, then dropout.
  """

  num_heads: int = 16  # N
  head_dim: int = 64  # H
  use_bias: bool = False  # biases on the projections
  dropout_rate: float = 0.0  # dropout on the output projection
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype
  # None: this library's einsum attention (layers.dot_product_attention); "xla" or "cudnn":
  # jax.nn.dot_product_attention's. On a CPU the einsums are faster: one guided amused-256
  # U-ViT call in bf16 takes 1260 against 1402 ms (mid size: 286 against 315 ms).
  implementation: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, context: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """x: [B, L, D]; context: [B, S, Dc] or None -> [B, L, D]."""
    n, h = self.num_heads, self.head_dim
    dense = lambda features, axes, name, contract=1: Dense(
      features, axes, contract, self.use_bias, self.dtype, self.param_dtype, name=name
    )
    if context is None:
      qkv = dense((3, n, h), (EMBED, None, HEADS, HEAD_DIM), "qkv")(x)  # [B, L, 3, N, H]
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = dense((n, h), (EMBED, HEADS, HEAD_DIM), "q")(x)  # [B, L, N, H]
      kv = dense((2, n, h), (EMBED, None, HEADS, HEAD_DIM), "kv")(context)  # [B, S, 2, N, H]
      k, v = kv[:, :, 0], kv[:, :, 1]
    if self.implementation is None:
      out = dot_product_attention(q, k, v, mask=None)  # [B, L, N, H]
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = dense((x.shape[-1],), (HEADS, HEAD_DIM, EMBED), "out", contract=2)(out)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class GegluMLP(nn.Module):
  """``W_o (a * gelu(g))`` with ``[a, g] = W_i x`` (diffusers ``FeedForward`` + ``GEGLU``).

  GELU is the exact (erf) one, as in PyTorch's default. The fused input kernel is
  ``[D, 2, F]``: index 0 is the value half, 1 the gate half.
  """

  intermediate_size: int = 2816  # F
  use_bias: bool = False  # biases on both projections
  dropout_rate: float = 0.0  # dropout after the gated activation
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [B, L, D] -> [B, L, D]."""
    f = self.intermediate_size
    y = Dense(
      (2, f), (EMBED, None, MLP), 1, self.use_bias, self.dtype, self.param_dtype, name="wi"
    )(x)
    y = y[..., 0, :] * jax.nn.gelu(y[..., 1, :].astype(jnp.float32), approximate=False).astype(
      self.dtype
    )
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return Dense(
      (x.shape[-1],), (MLP, EMBED), 1, self.use_bias, self.dtype, self.param_dtype, name="wo"
    )(y)


class TransformerLayer(nn.Module):
  """One U-ViT transformer layer (diffusers ``BasicTransformerBlock``, ``ada_norm_continuous``).

  Pre-norm residual sub-blocks, each norm modulated by the conditioning vector:
  AdaRMSNorm -> self-attention; AdaRMSNorm -> cross-attention to the text;
  AdaLayerNorm -> GEGLU MLP. The call signature fits ``nn.scan``.
  """

  num_heads: int = 16  # N
  intermediate_size: int = 2816  # F
  eps: float = 1e-6  # norm epsilon
  use_scale: bool = True  # elementwise weights of the norms
  use_bias: bool = False  # biases everywhere
  dropout_rate: float = 0.0  # dropout on attention outputs and in the MLP
  deterministic: bool = True  # disables dropout
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype
  attention_implementation: str | None = None  # see Attention.implementation

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, cond: jax.Array) -> tuple[jax.Array, None]:
    """x: [B, L, D]; context: [B, T, D]; cond: [B, D] -> ([B, L, D], None)."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
        f"hidden_size {width} is not divisible by num_attention_heads {self.num_heads}"
      )
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ada = lambda kind, name: AdaNorm(
      kind, self.eps, self.use_scale, self.use_bias, **types, name=name
    )
    attn = lambda name: Attention(
      self.num_heads,
      width // self.num_heads,
      self.use_bias,
      self.dropout_rate,
      **types,
      implementation=self.attention_implementation,
      name=name,
    )
    x = x + attn("attn1")(ada("rms", "norm1")(x, cond), None, self.deterministic)
    x = x + attn("attn2")(ada("rms", "norm2")(x, cond), context, self.deterministic)
    mlp = GegluMLP(self.intermediate_size, self.use_bias, self.dropout_rate, **types, name="ff")
    x = x + mlp(ada("layer", "norm3")(x, cond), self.deterministic)
    return x.astype(self.dtype), None


class GlobalResponseNorm(nn.Module):
  """ConvNeXt-V2 GRN (Woo et al. 2023): ``gamma * (x * n) + beta + x``.

  ``n`` is each channel's L2 norm over the spatial axes divided by its mean over
  channels (diffusers ``GlobalResponseNorm``, which zero-initialises gamma/beta).
  """

  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, Y, X, C] -> float32 [B, Y, X, C]."""
    x = x.astype(jnp.float32)
    param = lambda name: self.param(
      name,
      nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    gx = jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2), keepdims=True))  # [B, 1, 1, C]
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
    return param("gamma") * (x * nx) + param("beta") + x


class ConvNextBlock(nn.Module):
  """ConvNeXt-V2 block with AdaLN-style output modulation (diffusers ``ConvNextBlock``).

  depthwise 3x3 conv -> RMSNorm -> Linear(C, 4C) -> GELU -> GRN -> Linear(4C, C)
  -> dropout -> + input -> ``* (1 + scale) + shift`` from ``W silu(cond)``.
  """

  ffn_factor: int = 4  # MLP expansion
  eps: float = 1e-6  # RMSNorm epsilon
  use_scale: bool = True  # RMSNorm weight
  use_bias: bool = False  # biases of the conv and linears
  dropout_rate: float = 0.0  # dropout after the second linear
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [B, Y, X, C]; cond: [B, D] -> [B, Y, X, C]."""
    channels = x.shape[-1]
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    kernel = self.param(
      "depthwise",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, NORM)),
      (3, 3, 1, channels),
      self.param_dtype,
    )
    y = depthwise_conv3x3(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param(
        "depthwise_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        (channels,),
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    y = RMSNorm(self.eps, self.use_scale, **types, name="norm")(y)
    y = Dense(
      (channels * self.ffn_factor,), (EMBED, MLP), 1, self.use_bias, **types, name="linear_1"
    )(y)
    y = GlobalResponseNorm(self.param_dtype, name="grn")(
      jax.nn.gelu(y.astype(jnp.float32), approximate=False)
    )
    y = Dense((channels,), (MLP, EMBED), 1, self.use_bias, **types, name="linear_2")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = y.astype(jnp.float32) + residual.astype(jnp.float32)
    modulation = Dense(
      (2, channels), (EMBED, None, None), 1, self.use_bias, **types, name="modulation"
    )(nn.silu(cond)).astype(jnp.float32)[:, None, None]  # [B, 1, 1, 2, C]: scale, shift
    return (y * (1.0 + modulation[..., 0, :]) + modulation[..., 1, :]).astype(self.dtype)


class BlockAttention(nn.Module):
  """Two cross-attention sub-blocks to the text (diffusers ``SkipFFTransformerBlock``).

  The text (width D) is mapped to the block width C by ``Linear(silu(.))`` when
  the widths differ. Both sub-blocks cross-attend to it (no self-attention, no
  MLP), each after an RMSNorm whose eps is 1e-6 and whose weight always exists,
  whatever the model's norm settings (as in diffusers).
  """

  num_heads: int = 12  # N
  use_bias: bool = False  # biases of the projections
  dropout_rate: float = 0.0  # dropout on attention outputs
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype
  attention_implementation: str | None = None  # see Attention.implementation

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [B, L, C]; context: [B, T, D] -> [B, L, C]."""
    channels = x.shape[-1]
    if channels % self.num_heads:
      raise ValueError(
        f"block_out_channels {channels} is not divisible by block_num_heads {self.num_heads}"
      )
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if context.shape[-1] != channels:
      context = Dense((channels,), (EMBED, None), 1, self.use_bias, **types, name="kv_mapper")(
        nn.silu(context)
      )
    for i in (1, 2):
      attn = Attention(
        self.num_heads,
        channels // self.num_heads,
        self.use_bias,
        self.dropout_rate,
        **types,
        implementation=self.attention_implementation,
        name=f"attn{i}",
      )
      x = x + attn(RMSNorm(1e-6, True, **types, name=f"norm{i}")(x), context, deterministic)
    return x
