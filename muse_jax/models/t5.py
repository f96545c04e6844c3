"""The T5 encoder stack (Raffel et al. 2020), the frozen text encoder of Muse (paper §2.1).

Muse conditions on the last hidden state of a pre-trained T5-XXL encoder (4096-d per
token), projected to the transformer's width by each model. The encoder is a stack of
pre-norm blocks, each ``x += Attention(RMSNorm(x)); x += MLP(RMSNorm(x))``, followed by
a final RMS norm, with three T5 particulars:

* no absolute positions: a learned scalar per head and *relative position bucket* is
  added to the attention logits. Buckets are exact for small distances and logarithmic
  up to ``max_distance`` (Mesh TensorFlow's scheme); the bias is computed once and shared
  by all layers (in checkpoints it lives in the first block);
* no biases anywhere, RMS norm without mean subtraction or shift, and attention logits
  that are *not* scaled by 1/sqrt(head_dim) (the scale is folded into the initialisation);
* two feed-forward variants: ReLU (original T5) and gated GELU (T5 v1.1, FLAN-T5, the
  T5-XXL Muse uses): ``wo(gelu(wi_0 x) * wi_1 x)``.

Layers are an ``nn.scan`` over one block (parameters stacked on a leading ``LAYERS``
axis), so T5-XXL compiles as fast as a 1-layer model. Every parameter carries logical
axis names: ``EMBED`` shards over ``fsdp`` and ``HEADS``/``MLP``/``VOCAB`` over ``tensor``
under the default rules, which splits the 4.76B-parameter T5-XXL encoder 8 ways on a
(fsdp=4, tensor=2) mesh. Norms and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.partitioning import (
  BATCH,
  EMBED,
  HEAD_DIM,
  HEADS,
  LAYERS,
  MLP,
  NORM,
  REL_POS,
  TEXT_LENGTH,
  VOCAB,
  constrain,
)

Dtype = jnp.dtype | type

# Activation functions by their transformers (ACT2FN) names, as config.json spells them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an activation by its transformers name, with a clear error."""
  if name not in ACTIVATIONS:
    raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def relative_position_bucket(
  relative_position: jax.Array,
  *,
  bidirectional: bool = True,
  num_buckets: int = 32,
  max_distance: int = 128,
) -> jax.Array:
  """Maps relative positions (key - query) to T5's bucket ids.

  Half of the buckets (per direction when bidirectional) hold exact distances
  0..max_exact-1, the rest cover max_exact..max_distance logarithmically; farther
  distances share the last bucket. Positive offsets (keys to the right) use the upper
  half of the buckets when bidirectional.

  Args:
    relative_position: int array of ``key_position - query_position``.
    bidirectional: encoder (True) or causal decoder (False) bucketing.
    num_buckets: total number of buckets.
    max_distance: distance from which all offsets share one bucket.

  Returns:
    int32 array of the same shape with values in ``[0, num_buckets)``.
  """
  buckets = jnp.zeros_like(relative_position, dtype=jnp.int32)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # float32 and truncation towards zero, as the reference implementations compute it.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  scaled = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  if_large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, if_large).astype(jnp.int32)


class T5RMSNorm(nn.Module):
  """RMS layer norm: ``scale * x / sqrt(mean(x^2) + eps)``, no mean, no shift."""

  eps: float = 1e-6  # added to the mean square.
  dtype: Dtype = jnp.float32  # output dtype; the statistics are float32 always.
  param_dtype: Dtype = jnp.float32  # storage dtype of the scale.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)


class T5RelativePositionBias(nn.Module):
  """A learned attention-logit bias per head and relative-position bucket."""

  num_heads: int = 64  # N.
  num_buckets: int = 32  # rows of the bias table.
  max_distance: int = 128  # offsets this far or farther share the last bucket.
  bidirectional: bool = True  # False only for a causal decoder.
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> jax.Array:
    """Returns the float32 bias ``[N, T, S]`` for T queries and S keys."""
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), (REL_POS, HEADS)),
      (self.num_buckets, self.num_heads),
      self.param_dtype,
    )
    relative = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]  # [T, S]
    buckets = relative_position_bucket(
      relative,
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )
    bias = jnp.take(table, buckets, axis=0).astype(jnp.float32)  # [T, S, N]
    return jnp.transpose(bias, (2, 0, 1))


class T5Attention(nn.Module):
  """Multi-head self-attention without biases or logit scaling, plus a position bias."""

  num_heads: int = 64  # N.
  head_dim: int = 64  # H (d_kv); N * H need not equal the model width.
  dtype: Dtype = jnp.float32  # compute dtype; logits and softmax are float32.
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
    """Attends ``x [B, T, D]`` to itself with ``bias [N, T, T]`` and key ``mask [B, T]``."""
    width = x.shape[-1]
    in_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)

    def kernel(name, init, shape, axes):
      return self.param(
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
      ).astype(self.dtype)

    qkv_shape, qkv_axes = (width, self.num_heads, self.head_dim), (EMBED, HEADS, HEAD_DIM)
    x = x.astype(self.dtype)
    q, k, v = (
      constrain(
        jnp.einsum("BTD,DNH->BTNH", x, kernel(name, in_init, qkv_shape, qkv_axes)),
        (BATCH, TEXT_LENGTH, HEADS, HEAD_DIM),
      )
      for name in ("query", "key", "value")
    )
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) + bias[None]
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = constrain(jnp.einsum("BNTS,BSNH->BTNH", probs, v), (BATCH, TEXT_LENGTH, HEADS, HEAD_DIM))
    w_out = kernel(
      "out", out_init, (self.num_heads, self.head_dim, width), (HEADS, HEAD_DIM, EMBED)
    )
    return jnp.einsum("BTNH,NHD->BTD", out, w_out)


class T5MLP(nn.Module):
  """Feed-forward: ``wo(act(wi x))`` or, gated, ``wo(act(wi_0 x) * wi_1 x)``."""

  mlp_dim: int = 10240  # F (d_ff).
  activation: str = "gelu_new"  # a transformers activation name (ACTIVATIONS).
  gated: bool = True  # T5 v1.1 / FLAN-T5 (True) or original T5 (False).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    act = activation(self.activation)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def kernel(name, shape, axes):
      return self.param(
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
      ).astype(self.dtype)

    x = x.astype(self.dtype)
    if self.gated:
      hidden = act(
        jnp.einsum("BTD,DF->BTF", x, kernel("wi_0", (width, self.mlp_dim), (EMBED, MLP)))
      )
      hidden *= jnp.einsum("BTD,DF->BTF", x, kernel("wi_1", (width, self.mlp_dim), (EMBED, MLP)))
    else:
      hidden = act(jnp.einsum("BTD,DF->BTF", x, kernel("wi", (width, self.mlp_dim), (EMBED, MLP))))
    hidden = constrain(hidden, (BATCH, TEXT_LENGTH, MLP))
    return jnp.einsum("BTF,FD->BTD", hidden, kernel("wo", (self.mlp_dim, width), (MLP, EMBED)))


class T5Block(nn.Module):
  """One pre-norm encoder block; the body of the layer scan (returns ``(x, None)``)."""

  num_heads: int = 64
  head_dim: int = 64
  mlp_dim: int = 10240
  activation: str = "gelu_new"
  gated: bool = True
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
    norm = dict(eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype)
    h = T5RMSNorm(**norm, name="attention_norm")(x)
    x = x + T5Attention(
      self.num_heads,
      self.head_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attention",
    )(h, bias, mask)
    h = T5RMSNorm(**norm, name="mlp_norm")(x)
    x = x + T5MLP(
      self.mlp_dim,
      self.activation,
      self.gated,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="mlp",
    )(h)
    return constrain(x, (BATCH, TEXT_LENGTH, EMBED)), None


class T5Encoder(nn.Module):
  """T5 encoder: token ids and padding mask -> final-norm hidden states ``[B, T, D]``.

  Defaults are T5-XXL v1.1 (the encoder Muse uses). Parameter names: ``embedding``,
  ``relative_position_bias/embedding``, ``blocks/{attention,mlp,..._norm}/...`` stacked
  over layers, ``final_norm/scale``.
  """

  vocab_size: int = 32128  # rows of the token embedding.
  embed_dim: int = 4096  # D (d_model).
  num_layers: int = 24
  num_heads: int = 64  # N.
  head_dim: int = 64  # H (d_kv).
  mlp_dim: int = 10240  # F (d_ff).
  activation: str = "gelu_new"  # feed-forward activation (transformers name).
  gated: bool = True  # gated feed-forward (T5 v1.1 / FLAN-T5) or not (original T5).
  num_buckets: int = 32  # relative attention buckets.
  max_distance: int = 128  # relative attention max distance.
  eps: float = 1e-6  # RMS norm epsilon.
  dtype: Dtype = jnp.float32  # compute dtype (float32 or bfloat16).
  param_dtype: Dtype = jnp.float32  # storage dtype of the parameters.

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Encodes ``ids`` int32 [B, T] whose valid tokens are ``mask`` bool [B, T].

    Returns:
      ``[B, T, D]`` in ``dtype``; rows at padded positions are computed (they attend to
      the valid tokens) but carry no meaning.
    """
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), (VOCAB, EMBED)),
      (self.vocab_size, self.embed_dim),
      self.param_dtype,
    )
    # Gather from a table sharded over the vocabulary only: the width's fsdp shards would
    # clash with the batch's, and XLA would replicate the whole table to resolve it.
    table = constrain(table, (VOCAB, None))
    x = constrain(jnp.take(table, ids, axis=0).astype(self.dtype), (BATCH, TEXT_LENGTH, EMBED))
    length = ids.shape[1]
    bias = T5RelativePositionBias(
      self.num_heads,
      self.num_buckets,
      self.max_distance,
      param_dtype=self.param_dtype,
      name="relative_position_bias",
    )(length, length)
    blocks = nn.scan(
      T5Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=self.num_layers,
      metadata_params={nn.PARTITION_NAME: LAYERS},
    )
    x, _ = blocks(
      self.num_heads,
      self.head_dim,
      self.mlp_dim,
      self.activation,
      self.gated,
      self.eps,
      self.dtype,
      self.param_dtype,
      name="blocks",
    )(x, bias, mask.astype(bool))
    x = T5RMSNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
    return constrain(x, (BATCH, TEXT_LENGTH, EMBED))
