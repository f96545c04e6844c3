"""The Muse masked transformers: base (§2.3) and super-resolution (§2.4).

Base model (``MaskedTransformer``): the image is a grid of h x w VQ token ids in
[0, K); masked positions hold the mask token, id K. Token embeddings plus learned
2D position embeddings (one vector per grid cell) go through pre-LN blocks of
self-attention, cross-attention to the text and an MLP. The frozen text encoder's
outputs [B, T, Dt] (T5-XXL: Dt = 4096) are projected to the model width inside the
model (a linear map + LayerNorm), and padding tokens are masked out of the
cross-attention. A final LayerNorm and an MLP head (D -> D, GELU, LayerNorm -> K)
give logits over the K codes; the mask token is never predicted.

Super-resolution model (``SuperResTransformer``): the low-res ids (all known, from
the base model) are embedded and passed through self-attention layers (the
"low-res encoder"); its outputs are concatenated with the projected text, and the
high-res masked transformer (64x64 = 4096 tokens, multi-axis self-attention by
default) cross-attends to that sequence.

Call signature, shared by the trainer, the sampler and the pipeline::

  logits = model.apply({"params": p}, ids, text_emb, text_mask)             # base
  logits = model.apply({"params": p}, ids, text_emb, text_mask, low_res_ids)  # super-res
  # ids int32 [B, L] in [0, K] (K = mask), text_emb [B, T, Dt], text_mask bool [B, T],
  # low_res_ids int32 [B, l]; logits float32 [B, L, K].

Where the paper is silent, this implementation assumes: 64-dim attention heads,
GELU MLPs, biases on all projections except attention keys (softmax ignores a key
bias), text projection = linear + LayerNorm, an embedding table of K + 1 rows padded
to a multiple of 128 (so that it shards evenly), an untied output head, no dropout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.layers import Dtype, dense, embed_init, layer_norm
from muse_jax.models.stack import BlockStack
from muse_jax.partitioning import (
  BATCH,
  EMBED,
  LENGTH,
  MLP,
  TEXT_EMBED,
  TEXT_LENGTH,
  VOCAB,
  constrain,
)

_VOCAB_MULTIPLE = 128


def padded_vocab(num_ids: int) -> int:
  """Rows of an embedding table for ``num_ids`` ids, rounded up to shard evenly."""
  return -(-num_ids // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


class TokenEmbedding(nn.Module):
  """Token embedding + learned 2D position embedding (one vector per grid cell)."""

  num_ids: int = 8193  # Distinct ids (K codes + the mask token).
  grid: tuple[int, int] = (16, 16)  # (h, w) of the token grid.
  width: int = 1280  # D.
  dropout_rate: float = 0.0  # Dropout on the embeddings.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(self, ids: jax.Array, *, train: bool = False) -> jax.Array:
    h, w = self.grid
    if ids.ndim != 2 or ids.shape[1] != h * w:
      raise ValueError(f"ids must be [B, {h * w}] for a {h}x{w} grid; got shape {ids.shape}")
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(embed_init, (VOCAB, EMBED)),
      (padded_vocab(self.num_ids), self.width),
      self.param_dtype,
    )
    position = self.param(
      "position",
      nn.with_logical_partitioning(embed_init, (LENGTH, EMBED)),
      (h * w, self.width),
      self.param_dtype,
    )
    x = jnp.take(table, ids, axis=0) + position[None]  # [B, L, D]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return constrain(x.astype(self.dtype), (BATCH, LENGTH, EMBED))


class TextProjection(nn.Module):
  """Projects frozen text-encoder outputs [B, T, Dt] to the model width [B, T, D]."""

  width: int = 1280  # D.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(self, text_emb: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.width, (TEXT_EMBED, EMBED), name="proj", **kw)(text_emb.astype(self.dtype))
    x = layer_norm(name="norm", **kw)(x)
    return constrain(x, (BATCH, TEXT_LENGTH, EMBED))


class OutputHead(nn.Module):
  """Final LayerNorm, then D -> D, GELU, LayerNorm, D -> K logits (float32)."""

  vocab_size: int = 8192  # K.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    x = layer_norm(name="final_norm", **kw)(x)
    x = nn.gelu(
      dense(width, (EMBED, MLP), name="dense", **kw)(x)
    )  # [B, L, D] (MLP-like axis names)
    x = layer_norm(name="norm", **kw)(x)
    logits = dense(self.vocab_size, (EMBED, VOCAB), name="logits", **kw)(x)  # [B, L, K]
    return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, VOCAB))


def _check_text(text_emb: jax.Array, text_mask: jax.Array, batch: int) -> None:
  if text_emb.ndim != 3 or text_mask.shape != text_emb.shape[:2] or text_emb.shape[0] != batch:
    raise ValueError(
      f"text_emb must be [B={batch}, T, Dt] and text_mask [B, T]; got {text_emb.shape} and "
      f"{text_mask.shape}"
    )


def _block_flops(
  length: int, attended: int, memory: int, width: int, mlp: int, cross: bool
) -> float:
  """Matmul FLOPs of one block's forward pass for one example (2 per multiply-add)."""
  flops = 8 * length * width**2 + 4 * length * attended * width  # self-attention
  if cross:
    flops += 4 * length * width**2 + 4 * memory * width**2 + 4 * length * memory * width
  return flops + 4 * length * width * mlp


class MaskedTransformer(nn.Module):
  """Muse base model: text-conditioned masked token prediction (paper §2.3).

  Defaults are the 632M model (24 layers, width 1280, MLP 5120, 20 heads).
  """

  vocab_size: int = 8192  # K codes; id K is the mask token.
  grid: tuple[int, int] = (16, 16)  # (h, w) token grid; L = h * w.
  width: int = 1280  # D.
  num_layers: int = 24  # Transformer blocks.
  num_heads: int = 20  # N; head dim H = D / N.
  mlp_dim: int = 5120  # F.
  attention: str = "full"  # Self-attention: "full" or "multi_axis".
  window: int = 8  # Multi-axis block / grid side.
  # A learned 2D relative position bias in every full self-attention (multi-axis
  # attention gets none), on top of the absolute positions. Not in the paper; layers.py.
  # Each layer materialises an [N, L, L] float32 bias: 5 MiB for 20 heads over 16x16
  # tokens, but 1 GiB for 16 heads of full attention over 64x64.
  relative_position: bool = False
  # Depthwise 3x3 convolutions over the token grid on every block's self-attention and MLP
  # inputs (layers.GridConv). Not in the paper.
  local_conv: bool = False
  dropout_rate: float = 0.0  # Dropout (the paper does not use any).
  scan_layers: bool = True  # nn.scan over the blocks (LAYERS axis).
  remat_policy: str = "none"  # Activation rematerialisation, see stack.REMAT_POLICIES.
  dtype: Dtype = jnp.float32  # Computation dtype (bfloat16 on TPU).
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def length(self) -> int:
    return self.grid[0] * self.grid[1]

  def _blocks(self, num_layers: int, cross: bool, attention: str, grid, train: bool, name: str):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    return BlockStack(
      num_layers=num_layers,
      num_heads=self.num_heads,
      head_dim=self.width // self.num_heads,
      mlp_dim=self.mlp_dim,
      cross_attention=cross,
      attention=attention,
      grid=grid,
      window=self.window,
      relative_position=self.relative_position and attention == "full",
      local_conv=self.local_conv,
      dropout_rate=self.dropout_rate,
      deterministic=not train,
      scan=self.scan_layers,
      remat_policy=self.remat_policy,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  @nn.compact
  def __call__(
    self, ids: jax.Array, text_emb: jax.Array, text_mask: jax.Array, *, train: bool = False
  ) -> jax.Array:
    """Logits float32 [B, L, K] for ids [B, L] given text [B, T, Dt] and mask [B, T]."""
    _check_text(text_emb, text_mask, ids.shape[0])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = TokenEmbedding(
      self.vocab_size + 1, self.grid, self.width, self.dropout_rate, name="embed", **kw
    )(ids, train=train)
    memory = TextProjection(self.width, name="text_proj", **kw)(text_emb)
    x = self._blocks(self.num_layers, True, self.attention, self.grid, train, "blocks")(
      x, memory, text_mask.astype(bool)
    )
    return OutputHead(self.vocab_size, name="head", **kw)(x)

  def forward_flops(self, text_length: int, text_dim: int) -> float:
    """Model FLOPs of one forward pass for one example (for MFU; no remat)."""
    d, length = self.width, self.length
    attended = length if self.attention == "full" else self.window**2
    blocks = self.num_layers * _block_flops(length, attended, text_length, d, self.mlp_dim, True)
    head = 2 * length * d * d + 2 * length * d * self.vocab_size
    return blocks + head + 2 * text_length * text_dim * d


class SuperResTransformer(MaskedTransformer):
  """Muse super-resolution model: low-res ids + text -> high-res ids (paper §2.4).

  Defaults are the paper's 512x512 model: 16 low-res encoder layers, 32 high-res
  layers, width 1024, MLP 4096, multi-axis attention over the 64x64 tokens.
  """

  grid: tuple[int, int] = (64, 64)  # High-res (h, w).
  width: int = 1024  # D.
  num_layers: int = 32  # High-res blocks.
  num_heads: int = 16  # N.
  mlp_dim: int = 4096  # F.
  attention: str = "multi_axis"  # High-res self-attention.
  low_vocab_size: int = 8192  # Codes of the low-res tokenizer.
  low_grid: tuple[int, int] = (16, 16)  # Low-res (h, w).
  num_low_layers: int = 16  # Low-res encoder blocks (self-attention only).

  @nn.compact
  def __call__(
    self,
    ids: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    low_res_ids: jax.Array | None = None,
    *,
    train: bool = False,
  ) -> jax.Array:
    """Logits [B, L, K] for high-res ids [B, L] given text and low-res ids [B, l]."""
    if low_res_ids is None:
      raise ValueError("the super-resolution model needs low_res_ids [B, l]")
    _check_text(text_emb, text_mask, ids.shape[0])
    if low_res_ids.shape[0] != ids.shape[0]:
      raise ValueError(f"low_res_ids batch {low_res_ids.shape[0]} != ids batch {ids.shape[0]}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    low = TokenEmbedding(
      self.low_vocab_size, self.low_grid, self.width, self.dropout_rate, name="low_embed", **kw
    )(low_res_ids, train=train)
    low = self._blocks(self.num_low_layers, False, "full", self.low_grid, train, "low_encoder")(low)
    text = TextProjection(self.width, name="text_proj", **kw)(text_emb)
    memory = jnp.concatenate([low, text], axis=1)  # [B, l + T, D]
    memory = constrain(memory, (BATCH, TEXT_LENGTH, EMBED))
    memory_mask = jnp.concatenate([jnp.ones(low.shape[:2], bool), text_mask.astype(bool)], axis=1)
    x = TokenEmbedding(
      self.vocab_size + 1, self.grid, self.width, self.dropout_rate, name="embed", **kw
    )(ids, train=train)
    x = self._blocks(self.num_layers, True, self.attention, self.grid, train, "blocks")(
      x, memory, memory_mask
    )
    return OutputHead(self.vocab_size, name="head", **kw)(x)

  def forward_flops(self, text_length: int, text_dim: int) -> float:
    d, length = self.width, self.length
    low_length = self.low_grid[0] * self.low_grid[1]
    memory = low_length + text_length
    attended = length if self.attention == "full" else self.window**2
    low = self.num_low_layers * _block_flops(low_length, low_length, 0, d, self.mlp_dim, False)
    high = self.num_layers * _block_flops(length, attended, memory, d, self.mlp_dim, True)
    head = 2 * length * d * d + 2 * length * d * self.vocab_size
    return low + high + head + 2 * text_length * text_dim * d
