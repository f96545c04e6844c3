"""The CLIP text transformer (Radford et al. 2021), the frozen text encoder of aMUSEd.

aMUSEd (Patil et al. 2024) replaces Muse's T5-XXL (paper §2.1) with CLIP-L/14's text
tower: the transformer cross-attends to the *penultimate* layer's hidden states (before
the final layer norm) and its AdaLN layers take the *pooled* projection, i.e. the final
layer-normed state of the end-of-text token multiplied by the text projection.

The tower is a GPT-2-style pre-norm stack: token + learned absolute position
embeddings, blocks ``x += Attention(LN(x)); x += MLP(LN(x))`` with a causal mask and
quick-GELU (``x * sigmoid(1.702 x)``), all linear layers with biases, and a final layer
norm. Because the mask is causal, states at and before the end-of-text token do not
depend on the padding; pipelines (aMUSEd, Stable Diffusion) pass no padding mask and use
all positions.

Layers are an ``nn.scan`` over one block; the requested intermediate state is carried
through the scan (one extra ``[B, T, D]`` buffer) instead of stacking every layer's output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.t5 import activation
from muse_jax.partitioning import (
  BATCH,
  EMBED,
  HEAD_DIM,
  HEADS,
  LAYERS,
  MLP,
  NORM,
  TEXT_EMBED,
  TEXT_LENGTH,
  VOCAB,
  constrain,
)

Dtype = jnp.dtype | type

# eos_token_id written by transformers before v4.31; such configs pool at argmax(ids),
# which is the end-of-text token because it has the largest id of the CLIP vocabulary.
LEGACY_EOS_TOKEN_ID = 2


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
    name=name,
  )


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention with biases, logits scaled by 1/sqrt(H)."""

  num_heads: int = 12  # N.
  dtype: Dtype = jnp.float32  # compute dtype; logits and softmax are float32.
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, T, D] -> [B, T, D]``."""
    width, length = x.shape[-1], x.shape[1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    in_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2))
    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2)

    def param(name, init, shape, axes):
      return self.param(
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
      ).astype(self.dtype)

    x = x.astype(self.dtype)
    heads = []
    for name in ("query", "key", "value"):
      w = param(
        f"{name}_kernel", in_init, (width, self.num_heads, head_dim), (EMBED, HEADS, HEAD_DIM)
      )
      b = param(
        f"{name}_bias", nn.initializers.zeros, (self.num_heads, head_dim), (HEADS, HEAD_DIM)
      )
      heads.append(
        constrain(jnp.einsum("BTD,DNH->BTNH", x, w) + b, (BATCH, TEXT_LENGTH, HEADS, HEAD_DIM))
      )
    q, k, v = heads
    logits = (
      jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    )
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))  # [T, S]
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = constrain(jnp.einsum("BNTS,BSNH->BTNH", probs, v), (BATCH, TEXT_LENGTH, HEADS, HEAD_DIM))
    w = param("out_kernel", out_init, (self.num_heads, head_dim, width), (HEADS, HEAD_DIM, EMBED))
    b = param("out_bias", nn.initializers.zeros, (width,), (EMBED,))
    return jnp.einsum("BTNH,NHD->BTD", out, w) + b


class CLIPMLP(nn.Module):
  """``fc2(act(fc1 x))`` with biases."""

  mlp_dim: int = 3072  # F.
  activation: str = "quick_gelu"  # a transformers activation name.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def param(name, init, shape, axes):
      return self.param(
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
      ).astype(self.dtype)

    x = x.astype(self.dtype)
    hidden = jnp.einsum(
      "BTD,DF->BTF", x, param("fc1_kernel", init, (width, self.mlp_dim), (EMBED, MLP))
    )
    hidden = activation(self.activation)(
      hidden + param("fc1_bias", nn.initializers.zeros, (self.mlp_dim,), (MLP,))
    )
    hidden = constrain(hidden, (BATCH, TEXT_LENGTH, MLP))
    out = jnp.einsum(
      "BTF,FD->BTD", hidden, param("fc2_kernel", init, (self.mlp_dim, width), (MLP, EMBED))
    )
    return out + param("fc2_bias", nn.initializers.zeros, (width,), (EMBED,))


class CLIPLayer(nn.Module):
  """One pre-norm block of the text transformer."""

  num_heads: int = 12
  mlp_dim: int = 3072
  activation: str = "quick_gelu"
  eps: float = 1e-5  # layer norm epsilon.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _layer_norm(self.eps, self.dtype, self.param_dtype, "attention_norm")(x)
    x = x + CLIPAttention(self.num_heads, self.dtype, self.param_dtype, name="attention")(h)
    h = _layer_norm(self.eps, self.dtype, self.param_dtype, "mlp_norm")(x)
    x = x + CLIPMLP(self.mlp_dim, self.activation, self.dtype, self.param_dtype, name="mlp")(h)
    return constrain(x, (BATCH, TEXT_LENGTH, EMBED))


class CLIPTextTransformer(nn.Module):
  """CLIP's text tower. Defaults are CLIP ViT-L/14 (the aMUSEd text encoder).

  Parameter names: ``token_embedding``, ``position_embedding``, ``layers/...`` (stacked),
  ``final_norm/{scale,bias}``, and ``projection`` when ``projection_dim`` is set.
  """

  vocab_size: int = 49408  # rows of the token embedding.
  max_length: int = 77  # rows of the position embedding: the longest input.
  embed_dim: int = 768  # D.
  num_layers: int = 12
  num_heads: int = 12  # N.
  mlp_dim: int = 3072  # F.
  activation: str = "quick_gelu"  # MLP activation (transformers name).
  eps: float = 1e-5  # layer norm epsilon.
  eos_token_id: int = LEGACY_EOS_TOKEN_ID  # pooled position: first such token (2: argmax).
  projection_dim: int | None = 768  # P of the text projection; None: pooled is [B, D].
  dtype: Dtype = jnp.float32  # compute dtype (float32 or bfloat16).
  param_dtype: Dtype = jnp.float32  # storage dtype of the parameters.

  @nn.compact
  def __call__(
    self, ids: jax.Array, hidden_layer: int = -2
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodes ``ids`` int32 [B, T] (T <= max_length).

    Args:
      ids: token ids, each row holding an end-of-text token.
      hidden_layer: which hidden state to return, counted as transformers'
        ``hidden_states`` tuple: 0 = embeddings, k = output of layer k (before the final
        norm), negative from the end (-1 = last layer, -2 = penultimate, aMUSEd's).

    Returns:
      ``(hidden [B, T, D], last [B, T, D], pooled [B, P])``: the requested hidden state,
      the final-norm last hidden state, and the end-of-text state of ``last``, projected
      when the model has a projection.
    """
    batch, length = ids.shape
    if length > self.max_length:
      raise ValueError(
        f"{length} tokens exceed the {self.max_length} positions of the CLIP text encoder"
      )
    if not -(self.num_layers + 1) <= hidden_layer <= self.num_layers:
      raise ValueError(
        f"hidden_layer={hidden_layer} is out of range for {self.num_layers} layers; expected "
        f"{-(self.num_layers + 1)}..{self.num_layers}"
      )
    target = hidden_layer % (self.num_layers + 1)  # index into (embeddings, layer 1, ...).
    tokens = self.param(
      "token_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
      (self.vocab_size, self.embed_dim),
      self.param_dtype,
    )
    positions = self.param(
      "position_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.01), (TEXT_LENGTH, EMBED)),
      (self.max_length, self.embed_dim),
      self.param_dtype,
    )
    # Gather from a table sharded over the vocabulary only (see T5Encoder).
    tokens = constrain(tokens, (VOCAB, None))
    x = (jnp.take(tokens, ids, axis=0) + positions[None, :length]).astype(self.dtype)
    x = constrain(x, (BATCH, TEXT_LENGTH, EMBED))

    def body(layer: CLIPLayer, carry, index):
      x, kept = carry
      x = layer(x)
      return (x, jnp.where(index + 1 == target, x, kept)), None

    scan = nn.scan(
      body,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.num_layers,
      metadata_params={nn.PARTITION_NAME: LAYERS},
    )
    layer = CLIPLayer(
      self.num_heads,
      self.mlp_dim,
      self.activation,
      self.eps,
      self.dtype,
      self.param_dtype,
      name="layers",
    )
    (x, hidden), _ = scan(layer, (x, x), jnp.arange(self.num_layers))
    last = _layer_norm(self.eps, self.dtype, self.param_dtype, "final_norm")(x)

    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos_position = jnp.argmax(ids, axis=-1)
    else:
      eos_position = jnp.argmax(ids == self.eos_token_id, axis=-1)  # the first one.
    pooled = last[jnp.arange(batch), eos_position]  # [B, D]
    if self.projection_dim is not None:
      projection = self.param(
        "projection",
        nn.with_logical_partitioning(
          nn.initializers.normal(self.embed_dim**-0.5), (EMBED, TEXT_EMBED)
        ),
        (self.embed_dim, self.projection_dim),
        self.param_dtype,
      )
      pooled = pooled @ projection.astype(self.dtype)
    return hidden, last, pooled
