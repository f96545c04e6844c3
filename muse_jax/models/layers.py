"""Transformer building blocks of the Muse models (paper §2.3, §2.4 and Figure 3).

A block is pre-LayerNorm: self-attention, then (optionally) cross-attention to a
conditioning sequence (the projected text, or low-res tokens + text for super-res)
with its padding mask, then an MLP, each added back to the residual stream.

Self-attention is either full, or multi-axis (HiT, Zhao et al. 2021; MaxViT, Tu et
al. 2022) for the 64x64 = 4096 tokens of the super-resolution model (§2.4): half of
the heads attend within non-overlapping P x P windows (block attention: local
detail), the other half across a G x G grid of tokens spaced (h/G, w/G) apart
(grid attention: sparse, global reach). Both halves together cost O(L (P² + G²))
instead of O(L²), and two blocks in a row connect any two tokens.

Every parameter carries logical axis names (``muse_jax.partitioning``) where it is
created, and activations are constrained at block boundaries, so the mesh rules
alone decide data / FSDP / tensor parallelism. Parameters are stored in
``param_dtype`` (float32) and computed in ``dtype`` (bfloat16 on TPU); softmax and
normalisation statistics stay in float32.

Full self-attention over a grid may add a learned 2D relative position bias (Swin, Liu
et al. 2021; CoAtNet, Dai et al. 2021): one scalar per head and per offset (dy, dx)
between query and key, shared by all positions. Muse uses absolute positions only; the
bias gives the attention translation equivariance, so that a relation between
neighbouring tokens learnt in one place holds in every place. For the same reason a block
may convolve the inputs of its self-attention and its MLP over the grid (3x3, depthwise;
``GridConv``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.partitioning import (
  BATCH,
  EMBED,
  HEAD_DIM,
  HEADS,
  KV_LENGTH,
  LENGTH,
  MLP,
  NORM,
  constrain,
)

Dtype = Any
ATTENTION_KINDS = ("full", "multi_axis")

# Embeddings: normal(0.02) (BERT / ViT); projections: truncated-normal fan-in (DenseGeneral).
embed_init = nn.initializers.normal(stddev=0.02)


class DenseGeneral(nn.Module):
  """A linear map contracting the last ``contract`` axes of x into ``features`` axes.

  Unlike ``nn.DenseGeneral``, the kernel is created at its final shape, so logical
  axis names (one per kernel dim: inputs, then outputs) apply to it directly, and
  fan-in counts all contracted dims.
  """

  features: tuple[int, ...] = (1,)  # Output dims.
  axes: tuple[str | None, ...] = (None, None)  # Logical names of the kernel dims.
  contract: int = 1  # Trailing input dims contracted.
  use_bias: bool = True  # Add a bias over the output dims.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.contract, len(self.features)
    if len(self.axes) != n_in + n_out:
      raise ValueError(f"kernel axes {self.axes} must name {n_in} input and {n_out} output dims")
    shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    init = nn.initializers.variance_scaling(
      1.0,
      "fan_in",
      "truncated_normal",
      in_axis=tuple(range(n_in)),
      out_axis=tuple(range(n_in, n_in + n_out)),
    )
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, self.axes), shape, self.param_dtype
    )
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in)
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
        tuple(self.features),
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


def dense(
  features: int | tuple[int, ...],
  axes: tuple[str | None, ...],
  *,
  contract: int = 1,
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str,
) -> DenseGeneral:
  """A ``DenseGeneral`` whose kernel dims are named ``axes`` (inputs, then outputs)."""
  features = (features,) if isinstance(features, int) else tuple(features)
  return DenseGeneral(features, tuple(axes), contract, use_bias, dtype, param_dtype, name=name)


def layer_norm(
  *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str
) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
    name=name,
  )


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Softmax attention with float32 logits.

  Args:
    q: [B, L, N, H] queries.
    k, v: [B, S, N, H] keys and values.
    mask: bool [B, S] (True = attend) or None.
    bias: [N, L, S] added to the logits (a relative position bias), or None.

  Returns:
    [B, L, N, H] in v's dtype.
  """
  logits = jnp.einsum("BLNH,BSNH->BNLS", q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[None]
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  # The softmax's division waits until after the values' sum: [B, N, L, H] quotients
  # instead of [B, N, L, S] (S = 256 keys against H = 64 per head in aMUSEd). On a CPU
  # one bf16 self-attention of the full-size aMUSEd U-ViT (guided, 256 tokens) takes
  # 23.7 against 26.3 ms.
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # as jax.nn.softmax
  weights = jnp.exp(logits - peak)  # [B, N, L, S]
  total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, N, L, 1]
  out = jnp.einsum(
    "BNLS,BSNH->BNLH", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
  )
  # Head-major, then swapped back: on a CPU XLA runs the batched matmul faster writing
  # [B, N, L, H] than [B, L, N, H] (one full-size aMUSEd U-ViT call in bf16: 3% less).
  return jnp.swapaxes((out / total).astype(v.dtype), 1, 2)


def relative_offsets(grid: tuple[int, int]) -> np.ndarray:
  """int32 [L, L]: for query i and key j of an h x w grid (row-major, L = h * w), the
  row of their offset (dy, dx) in a (2h - 1) x (2w - 1) table of offsets."""
  h, w = grid
  y, x = np.divmod(np.arange(h * w), w)  # [L] each
  dy = y[:, None] - y[None, :] + h - 1  # [L, L] in [0, 2h - 2]
  dx = x[:, None] - x[None, :] + w - 1
  return (dy * (2 * w - 1) + dx).astype(np.int32)


def _to_windows(x: jax.Array, grid: tuple[int, int], window: int, kind: str) -> jax.Array:
  """Regroups tokens into attention groups: [B, h*w, N, H] -> [B*G, S, N, H].

  "block": contiguous ``window x window`` patches. "grid": ``window x window``
  tokens spread evenly over the image (stride h/window, w/window).
  """
  b, _, n, d = x.shape
  h, w = grid
  p = window
  if kind == "block":
    x = x.reshape(b, h // p, p, w // p, p, n, d)  # [B, h/P, P, w/P, P, N, H]
    x = x.transpose(0, 1, 3, 2, 4, 5, 6)
  else:
    x = x.reshape(b, p, h // p, p, w // p, n, d)  # [B, G, h/G, G, w/G, N, H]
    x = x.transpose(0, 2, 4, 1, 3, 5, 6)
  return x.reshape(-1, p * p, n, d)


def _from_windows(
  x: jax.Array, batch: int, grid: tuple[int, int], window: int, kind: str
) -> jax.Array:
  """Inverse of ``_to_windows``: [B*G, S, N, H] -> [B, h*w, N, H]."""
  h, w = grid
  p = window
  n, d = x.shape[-2:]
  if kind == "block":
    x = x.reshape(batch, h // p, w // p, p, p, n, d).transpose(0, 1, 3, 2, 4, 5, 6)
  else:
    x = x.reshape(batch, h // p, w // p, p, p, n, d).transpose(0, 3, 1, 4, 2, 5, 6)
  return x.reshape(batch, h * w, n, d)


def multi_axis_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, grid: tuple[int, int], window: int
) -> jax.Array:
  """Block attention on the first half of the heads, grid attention on the second.

  Args:
    q, k, v: [B, L, N, H] with L = h * w and an even N.
    grid: (h, w) of the token grid; both divisible by ``window``.
    window: P, the side of a block and of the attended grid.

  Returns:
    [B, L, N, H].
  """
  b, length, n, _ = q.shape
  half = n // 2
  outs = []
  for kind, heads in (("block", slice(0, half)), ("grid", slice(half, n))):
    qs, ks, vs = (_to_windows(t[:, :, heads], grid, window, kind) for t in (q, k, v))
    outs.append(_from_windows(dot_product_attention(qs, ks, vs, None), b, grid, window, kind))
  return jnp.concatenate(outs, axis=2)


class Attention(nn.Module):
  """Multi-head attention: self (``memory=None``) or cross to a masked memory."""

  num_heads: int = 8  # N.
  head_dim: int = 64  # H.
  kind: str = "full"  # "full" or "multi_axis" (self-attention over a token grid only).
  grid: tuple[int, int] | None = None  # (h, w) of the queries, for multi-axis attention.
  window: int = 8  # Block / grid side P of multi-axis attention.
  relative_position: bool = False  # Learned 2D relative position bias (full self-attention).
  use_bias: bool = True  # Biases on the projections.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  def setup(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"unknown attention kind {self.kind!r}; expected one of {ATTENTION_KINDS}")
    if self.relative_position and (self.kind != "full" or self.grid is None):
      raise ValueError(
        "a relative position bias needs full self-attention over a grid; got "
        f"kind={self.kind!r}, grid={self.grid}"
      )
    if self.kind == "multi_axis":
      if self.grid is None or self.num_heads % 2:
        raise ValueError(
          f"multi-axis attention needs a grid and an even number of heads; got grid={self.grid}, "
          f"num_heads={self.num_heads}"
        )
      if self.grid[0] % self.window or self.grid[1] % self.window:
        raise ValueError(f"multi-axis window {self.window} must divide the token grid {self.grid}")

  @nn.compact
  def __call__(
    self, x: jax.Array, memory: jax.Array | None = None, memory_mask: jax.Array | None = None
  ) -> jax.Array:
    """Attends from ``x`` [B, L, D] to itself or to ``memory`` [B, S, D] (mask [B, S])."""
    width = x.shape[-1]
    proj = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    heads = (self.num_heads, self.head_dim)
    source = x if memory is None else memory
    q = dense(heads, (EMBED, HEADS, HEAD_DIM), name="query", **proj)(x)  # [B, L, N, H]
    # No key bias: it adds q·b to all logits of a query alike, which softmax ignores, so
    # its gradient is pure rounding noise (that Adafactor would normalise into updates).
    key_proj = dict(proj, use_bias=False)
    k = dense(heads, (EMBED, HEADS, HEAD_DIM), name="key", **key_proj)(source)  # [B, S, N, H]
    v = dense(heads, (EMBED, HEADS, HEAD_DIM), name="value", **proj)(source)
    q = constrain(q, (BATCH, LENGTH, HEADS, HEAD_DIM))
    k = constrain(k, (BATCH, KV_LENGTH, HEADS, HEAD_DIM))
    v = constrain(v, (BATCH, KV_LENGTH, HEADS, HEAD_DIM))
    if self.kind == "multi_axis" and memory is None:
      out = multi_axis_attention(q, k, v, self.grid, self.window)
    else:
      bias = self._relative_bias() if self.relative_position and memory is None else None
      out = dot_product_attention(q, k, v, memory_mask, bias)
    out = constrain(out, (BATCH, LENGTH, HEADS, HEAD_DIM))
    return dense(width, (HEADS, HEAD_DIM, EMBED), contract=2, name="out", **proj)(out)

  def _relative_bias(self) -> jax.Array:
    """[N, L, L]: the bias of each head for every (query, key) pair, from a table of
    one row per 2D offset. Zero at initialisation, so training starts from plain
    attention."""
    h, w = self.grid
    table = self.param(
      "relative_bias",
      nn.with_logical_partitioning(nn.initializers.zeros, (None, HEADS)),
      ((2 * h - 1) * (2 * w - 1), self.num_heads),
      self.param_dtype,
    )  # [(2h-1)(2w-1), N]
    bias = jnp.take(table, relative_offsets(self.grid), axis=0)  # [L, L, N]
    return jnp.einsum("LSN->NLS", bias)


def shift(x: jax.Array, offset: int, axis: int) -> jax.Array:
  """``out[..., i, ...] = x[..., i + offset, ...]`` along ``axis``, zero where that is outside."""
  n = x.shape[axis]
  kept = jax.lax.slice_in_dim(x, max(offset, 0), n + min(offset, 0), axis=axis)
  pads = [(0, 0)] * x.ndim
  pads[axis] = (max(-offset, 0), max(offset, 0))
  return jnp.pad(kept, pads)


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 depthwise convolution, zero padding 1: x [B, Y, X, C], kernel [3, 3, 1, C].

  ``out[y, x] = sum_ij kernel[i, j] · x[y + i - 1, x + j - 1]``, computed as three row
  sums ``r_i[y, x] = sum_j kernel[i, j] · x[y, x + j - 1]`` of column-shifted copies of x,
  each then shifted by its row: ``out[y, x] = sum_i r_i[y + i - 1, x]``. The sums run in
  float32, as a convolution accumulates, and the result has x's dtype.

  Why not ``conv_general_dilated`` with ``feature_group_count=C``: XLA's CPU backend runs
  it ~35x slower (17 ms against 0.5 ms for [2, 16, 16, 768]). And against 9 slices of one
  padded copy, this form's gradient takes 6 ms instead of 26 at [64, 8, 8, 256] (the demo's
  MLP activations, where it first convolved) on a CPU; in bfloat16, which a CPU adds and multiplies only by converting, the forward
  takes 0.25 ms instead of 0.9 at [2, 16, 16, 768]. On accelerators they all fuse alike.
  """
  x32, k32 = x.astype(jnp.float32), kernel[:, :, 0].astype(jnp.float32)  # k32 [3, 3, C]
  columns = [shift(x32, j - 1, axis=2) for j in range(3)]  # x[b, y, x + j - 1, c]
  rows = [sum(columns[j] * k32[i, j] for j in range(3)) for i in range(3)]  # r_i
  return sum(shift(r, i - 1, axis=1) for i, r in enumerate(rows)).astype(x.dtype)


class GridConv(nn.Module):
  """``x + depthwise_conv3x3(x)`` over the token grid, the kernel started at zero.

  Gives a sub-layer's input its 3x3 neighbourhood of tokens, with one weight per channel
  and offset. Zero-initialised, so a block with it starts as the plain transformer's.
  Not in Muse: the demo's base puts one before its self-attention and one before its MLP
  (``TransformerBlock.local_conv``), so that what it learns about neighbouring tokens holds
  wherever they stand, as the convolutional token projections of CvT (Wu et al. 2021) and
  the convolutional feed-forward of PVTv2 (Wang et al. 2022) do. PVTv2 convolves the MLP's
  hidden activations; here the D input channels are convolved, not the F hidden ones: on
  a CPU the step is bound by memory traffic, and the narrow convolution costs a quarter.
  """

  grid: tuple[int, int]  # (h, w) of the L = h · w tokens, row-major.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, d = x.shape  # [B, L, D]
    if math.prod(self.grid) != length:
      raise ValueError(
        f"the conv grid {self.grid} holds {math.prod(self.grid)} tokens; got {length}"
      )
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.zeros, (None, None, EMBED)),
      (3, 3, d),
      self.param_dtype,
    )  # [3, 3, D]
    x = x.astype(self.dtype)
    grid = x.reshape(batch, *self.grid, d)  # [B, h, w, D]
    conv = depthwise_conv3x3(grid, kernel.astype(self.dtype)[:, :, None])  # [B, h, w, D]
    return x + conv.reshape(batch, length, d)


class Mlp(nn.Module):
  """Two-layer GELU MLP: D -> F -> D."""

  hidden_dim: int = 2048  # F.
  dropout_rate: float = 0.0  # Dropout on the hidden activations.
  deterministic: bool = True  # Disables dropout.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden_dim, (EMBED, MLP), name="wi", **kw)(x)  # [B, L, F]
    h = constrain(nn.gelu(h), (BATCH, LENGTH, MLP))
    h = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(h)
    return dense(x.shape[-1], (MLP, EMBED), name="wo", **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN block: x += SelfAttn(LN x); [x += CrossAttn(LN x, memory)]; x += MLP(LN x).

  With ``local_conv``, the self-attention and the MLP take ``GridConv(LN x)`` instead.
  ``__call__`` returns ``(x, None)`` so that the block can be ``nn.scan``-ned.
  """

  num_heads: int = 8  # N.
  head_dim: int = 64  # H.
  mlp_dim: int = 2048  # F.
  cross_attention: bool = True  # Whether to attend to the memory.
  attention: str = "full"  # Self-attention kind: "full" or "multi_axis".
  grid: tuple[int, int] | None = None  # (h, w) of the tokens (multi-axis, relative bias, conv).
  window: int = 8  # Multi-axis block / grid side.
  relative_position: bool = False  # 2D relative position bias in the self-attention.
  # A depthwise 3x3 convolution over the grid (GridConv) on the normed inputs of the
  # self-attention and of the MLP.
  local_conv: bool = False
  dropout_rate: float = 0.0  # Dropout after each sub-layer.
  deterministic: bool = True  # Disables dropout.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(
    self, x: jax.Array, memory: jax.Array | None = None, memory_mask: jax.Array | None = None
  ) -> tuple[jax.Array, None]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, **kw)
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(y)
    x = constrain(x, (BATCH, LENGTH, EMBED))  # [B, L, D]
    if self.local_conv and self.grid is None:
      raise ValueError("local_conv convolves over the token grid: give the block its grid (h, w)")
    h = layer_norm(name="norm_self", **kw)(x)
    if self.local_conv:
      h = GridConv(self.grid, name="conv_self", **kw)(h)
    h = Attention(
      kind=self.attention,
      grid=self.grid,
      window=self.window,
      relative_position=self.relative_position,
      name="self_attention",
      **attn,
    )(h)
    x = x + drop(h)
    if self.cross_attention:
      if memory is None:
        raise ValueError("this block cross-attends: pass memory [B, S, D] (and its mask)")
      h = layer_norm(name="norm_cross", **kw)(x)
      h = Attention(name="cross_attention", **attn)(h, memory, memory_mask)
      x = x + drop(h)
    h = layer_norm(name="norm_mlp", **kw)(x)
    if self.local_conv:
      h = GridConv(self.grid, name="conv_mlp", **kw)(h)
    h = Mlp(self.mlp_dim, self.dropout_rate, self.deterministic, name="mlp", **kw)(h)
    x = constrain(x + drop(h), (BATCH, LENGTH, EMBED))
    return x, None
