"""aMUSEd's U-ViT: diffusers ``UVit2DModel`` in Flax, same weights, same numbers.

aMUSEd (Patil et al. 2024, arXiv 2401.01808) is the open Muse-style model
(Chang et al. 2023, §2.2-2.4: a masked transformer over VQ tokens, conditioned on
text, sampled by parallel decoding). Its network is a U-ViT (Hoogeboom et al.
2023), which maps image token ids to logits over the codebook:

1. text: CLIP hidden states ``[B, T, 768]`` -> Linear -> RMSNorm = the context
   every cross-attention reads;
2. conditioning: the pooled CLIP embedding ``[B, 768]`` concatenated with a
   sinusoidal embedding (256 features each, cosines first) of the 5
   micro-conditions ``(orig_width, orig_height, crop_top, crop_left,
   aesthetic_score)`` -> Linear -> SiLU -> Linear = a vector ``c [B, D]`` that
   modulates every res block and every transformer norm (AdaLN);
3. stem: embedding of the ids (vocab 8256: 8192 codes, the mask id 8255) ->
   RMSNorm -> 1x1 conv;
4. down stage: [RMSNorm + 2x2 stride-2 conv], then ``num_res_blocks`` x
   (ConvNeXt-V2 block modulated by ``c``, two cross-attentions to the text);
5. RMSNorm -> Linear to ``hidden_size`` -> ``num_hidden_layers`` transformer
   layers (AdaRMSNorm self-attention, AdaRMSNorm cross-attention, AdaLayerNorm
   GEGLU MLP; no biases, no positional embeddings: the convolutions carry
   position) -> RMSNorm -> Linear back to the block width;
6. up stage: like 4 with [RMSNorm + 2x2 stride-2 transposed conv] at the end;
7. MLM head: 1x1 conv -> RMSNorm -> 1x1 conv to ``codebook_size`` logits (the
   mask id is never predicted).

Released configurations (the field defaults are amused-256's, as in diffusers):

* amused-256: hidden_size 1024, num_hidden_layers 22, num_attention_heads 16,
  intermediate_size 2816, in_channels = block_out_channels = 768,
  num_res_blocks 3, block_num_heads 12, codebook_size 8192, vocab_size 8256,
  sample_size 16 (16x16 tokens of a 256x256 image), no down/upsampling.
* amused-512: the same with ``downsample=True, upsample=True`` and
  sample_size 32: 32x32 tokens, the transformer runs on 16x16.

Layout differs from diffusers on purpose: activations are channels-last and the
logits come out ``[B, h, w, K]`` (diffusers: ``[B, K, h, w]``).
``muse_jax.convert.diffusers_uvit.load_uvit`` converts a diffusers folder.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.stack import apply_layers
from muse_jax.models.uvit_blocks import (
  BlockAttention,
  ConvNextBlock,
  Dense,
  Dtype,
  RMSNorm,
  TransformerLayer,
  timestep_embedding,
)
from muse_jax.partitioning import (
  BATCH,
  EMBED,
  LENGTH,
  NORM,
  TEXT_EMBED,
  TEXT_LENGTH,
  VOCAB,
  constrain,
)

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def fast_attention(dtype: Dtype, device: jax.Device | None = None) -> str | None:
  """The faster attention for a computation dtype on a device (default: JAX's first).

  cuDNN's fused attention on NVIDIA GPUs from Ampere on (compute capability 8.0; a T4 has
  7.5), in bfloat16 / float16 (it takes no float32): one guided amused-256 call on an H200
  in bfloat16 took 34.0 against 43.3 ms at 64 rows, and 4.35 against 4.61 ms at 2.
  Elsewhere the einsum attention (``None``), which on a CPU is faster than
  ``jax.nn.dot_product_attention``'s XLA implementation.
  """
  device = device or jax.devices()[0]
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  try:  # CUDA devices say "8.0"; others have no such attribute, or not in that form
    capability = tuple(int(x) for x in device.compute_capability.split("."))
  except (AttributeError, ValueError):
    capability = ()
  cuda = device.platform in ("gpu", "cuda")
  return "cudnn" if half and cuda and capability >= (8, 0) else None


def unstack_layers(params: dict) -> dict:
  """Scanned params (``layers``: each leaf stacked over the transformer layers) as the
  unrolled model's (``layers_0`` ... ``layers_{n-1}``); other params unchanged."""
  if "layers" not in params:
    return params
  stacked = params["layers"]
  (n,) = {leaf.shape[0] for leaf in jax.tree.leaves(stacked)}
  out = {k: v for k, v in params.items() if k != "layers"}
  out.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)})
  return out


# Parameters that every call casts to the compute dtype before its products.
_CAST_PARAMS = ("kernel", "depthwise")


def cast_kernels(params: dict, dtype: Dtype) -> dict:
  """The params with every kernel (dense, convolution, resampling) stored wider than
  ``dtype`` narrowed to it, and the norms' scales, biases and the id embedding as they
  are: the casts that each call of a model computing in ``dtype`` makes, done once.
  Kernels are never widened (bfloat16 storage stays half the size).

  Inside a decode loop XLA hoists the casts out of the loop, but still pays them on every
  call of the compiled decode: for the mid-size aMUSEd U-ViT in bfloat16 on 2 CPU cores,
  0.26 s of each 12-step image.
  """
  dtype = jnp.dtype(dtype)

  def cast(path, a):
    narrower = jnp.dtype(a.dtype).itemsize > dtype.itemsize
    return a.astype(dtype) if path[-1].key in _CAST_PARAMS and narrower else a

  return jax.tree_util.tree_map_with_path(cast, params)


class Resample(nn.Module):
  """RMSNorm, then a 2x2 stride-2 conv (``down``) or transposed conv (up).

  diffusers ``Downsample2D(padding=0, kernel_size=2, norm_type="rms_norm")`` pads
  one zero row/column at the bottom/right; with even sizes that padding is never
  read, so the conv is a reshape into 2x2 patches and one einsum. Likewise
  ``Upsample2D(use_conv_transpose=True, kernel_size=2)`` writes disjoint 2x2
  patches: one einsum and a reshape.
  """

  down: bool = True  # True: halve the resolution; False: double it
  eps: float = 1e-6  # RMSNorm epsilon
  use_scale: bool = True  # RMSNorm weight
  use_bias: bool = False  # conv bias
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, Y, X, C] -> [B, Y/2, X/2, C] (down) or [B, 2Y, 2X, C] (up)."""
    b, y, w, c = x.shape
    x = RMSNorm(self.eps, self.use_scale, self.dtype, self.param_dtype, name="norm")(x)
    axes = (None, None, EMBED, None) if self.down else (EMBED, None, None, None)
    shape = (2, 2, c, c) if self.down else (c, 2, 2, c)
    init = nn.initializers.lecun_normal(in_axis=(0, 1, 2) if self.down else 0, out_axis=-1)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
    kernel = kernel.astype(self.dtype)
    if self.down:
      x = x.reshape(b, y // 2, 2, w // 2, 2, c)
      x = jnp.einsum("BYPXQC,PQCO->BYXO", x, kernel)
    else:
      x = jnp.einsum("BYXC,CPQO->BYPXQO", x, kernel).reshape(b, 2 * y, 2 * w, c)
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
        (c,),
        self.param_dtype,
      )
      x = x + bias.astype(self.dtype)
    return x


class UVitStage(nn.Module):
  """[downsample], ``num_res_blocks`` x (ConvNeXt block, block attention), [upsample].

  diffusers ``UVitBlock``.
  """

  num_res_blocks: int = 3  # (ConvNeXt, attention) pairs
  num_heads: int = 12  # heads of the block attentions
  downsample: bool = False  # halve the resolution first
  upsample: bool = False  # double the resolution last
  eps: float = 1e-6  # norm epsilon
  use_scale: bool = True  # norm weights
  use_bias: bool = False  # biases everywhere
  hidden_dropout: float = 0.0  # dropout in the ConvNeXt blocks
  attention_dropout: float = 0.0  # dropout on block-attention outputs
  dtype: Dtype = jnp.float32  # computation dtype
  param_dtype: Dtype = jnp.float32  # parameter dtype
  attention_implementation: str | None = None  # see uvit_blocks.Attention.implementation

  @nn.compact
  def __call__(
    self, x: jax.Array, cond: jax.Array, context: jax.Array, deterministic: bool = True
  ) -> jax.Array:
    """x: [B, Y, X, C]; cond: [B, D]; context: [B, T, D] -> [B, Y', X', C]."""
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = Resample(True, self.eps, self.use_scale, self.use_bias, **types, name="downsample")(x)
    for i in range(self.num_res_blocks):
      x = ConvNextBlock(
        4,
        self.eps,
        self.use_scale,
        self.use_bias,
        self.hidden_dropout,
        **types,
        name=f"res_blocks_{i}",
      )(x, cond, deterministic)
      b, y, w, c = x.shape
      tokens = constrain(x.reshape(b, y * w, c), (BATCH, LENGTH, EMBED))  # [B, L, C]
      tokens = BlockAttention(
        self.num_heads,
        self.use_bias,
        self.attention_dropout,
        **types,
        attention_implementation=self.attention_implementation,
        name=f"attention_blocks_{i}",
      )(tokens, context, deterministic)
      x = tokens.reshape(b, y, w, c)
    if self.upsample:
      x = Resample(False, self.eps, self.use_scale, self.use_bias, **types, name="upsample")(x)
    return x


class UVit2D(nn.Module):
  """The aMUSEd U-ViT (diffusers ``UVit2DModel``); field names follow diffusers' config.

  Apply as ``UVit2D(...).apply({"params": params}, ids, encoder_hidden_states,
  pooled_text_emb, micro_conds)``.
  """

  hidden_size: int = 1024  # D: transformer width
  use_bias: bool = False  # biases on every projection (aMUSEd: none)
  hidden_dropout: float = 0.0  # dropout in MLPs, res blocks and transformer attentions
  cond_embed_dim: int = 768  # width of the pooled text embedding
  micro_cond_encode_dim: int = 256  # sinusoidal features per micro-condition
  micro_cond_embed_dim: int = 1280  # total micro-condition features (5 x 256)
  encoder_hidden_size: int = 768  # width of the text hidden states
  vocab_size: int = 8256  # input ids: codebook + mask id (the last id), rounded up
  codebook_size: int = 8192  # K: output logits
  in_channels: int = 768  # width of the id embedding and of the MLM head's hidden layer
  block_out_channels: int = 768  # C: width of the convolutional stages
  num_res_blocks: int = 3  # (ConvNeXt, attention) pairs per stage
  downsample: bool = False  # 2x2 downsampling before the transformer (amused-512)
  upsample: bool = False  # 2x2 upsampling after it (amused-512)
  block_num_heads: int = 12  # heads of the stage attentions
  num_hidden_layers: int = 22  # transformer layers
  num_attention_heads: int = 16  # N: transformer heads
  attention_dropout: float = 0.0  # dropout on the stage attentions' outputs
  intermediate_size: int = 2816  # F: GEGLU width
  layer_norm_eps: float = 1e-6  # epsilon of every norm (stage attentions: always 1e-6)
  ln_elementwise_affine: bool = True  # norms carry a learnable weight
  sample_size: int = 64  # token grid side the model was trained at (informational)
  # nn.scan over the transformer layers: stacked params, fast compile. Unrolled, XLA can hoist
  # each layer's text-only work out of a decode loop (the aMUSEd stage loads them so).
  scan_layers: bool = True
  dtype: Dtype = jnp.float32  # computation dtype (bfloat16 for speed); logits are float32
  param_dtype: Dtype = jnp.float32  # parameter dtype
  # None: einsums compiled by XLA (layers.dot_product_attention); "xla" or "cudnn" (fused,
  # NVIDIA GPUs, bfloat16 / float16 only): jax.nn.dot_product_attention's implementations.
  # `fast_attention` picks one for a dtype and device.
  attention_implementation: str | None = None

  @property
  def num_micro_conds(self) -> int:
    return self.micro_cond_embed_dim // self.micro_cond_encode_dim

  def _check_inputs(self, ids, encoder_hidden_states, pooled_text_emb, micro_conds) -> None:
    if ids.ndim != 3 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"ids must be integer [B, h, w]; got {ids.dtype} {ids.shape}")
    b, y, w = ids.shape
    expected = {
      "encoder_hidden_states": (encoder_hidden_states.shape, (b, "T", self.encoder_hidden_size)),
      "pooled_text_emb": (pooled_text_emb.shape, (b, self.cond_embed_dim)),
      "micro_conds": (micro_conds.shape, (b, self.num_micro_conds)),
    }
    for name, (found, want) in expected.items():
      if len(found) != len(want) or any(f != e for f, e in zip(found, want) if e != "T"):
        raise ValueError(f"{name} must have shape {want} for ids of shape {ids.shape}; got {found}")
    if self.micro_cond_embed_dim % self.micro_cond_encode_dim:
      raise ValueError(
        f"micro_cond_embed_dim {self.micro_cond_embed_dim} must be a multiple of "
        f"micro_cond_encode_dim {self.micro_cond_encode_dim}"
      )
    if self.downsample and (y % 2 or w % 2):
      raise ValueError(f"downsample=True needs an even token grid; got {y}x{w}")
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
        f"attention_implementation {self.attention_implementation!r} is not one of "
        f"{ATTENTION_IMPLEMENTATIONS}"
      )

  @nn.compact
  def __call__(
    self,
    ids: jax.Array,
    encoder_hidden_states: jax.Array,
    pooled_text_emb: jax.Array,
    micro_conds: jax.Array,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """Logits over the codebook for every token.

    Args:
      ids: int ``[B, h, w]`` token ids, the mask id (``vocab_size - 1`` in aMUSEd)
        where unknown.
      encoder_hidden_states: ``[B, T, encoder_hidden_size]`` text hidden states.
      pooled_text_emb: ``[B, cond_embed_dim]`` pooled text embedding.
      micro_conds: ``[B, 5]`` (orig_width, orig_height, crop_top, crop_left,
        aesthetic_score), as float.
      deterministic: disables dropout (pass False and a 'dropout' rng to train).

    Returns:
      float32 ``[B, h', w', codebook_size]``; ``h' = h`` unless only one of
      downsample/upsample is set.
    """
    self._check_inputs(ids, encoder_hidden_states, pooled_text_emb, micro_conds)
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps, affine, bias = self.layer_norm_eps, self.ln_elementwise_affine, self.use_bias
    b = ids.shape[0]

    context = Dense((self.hidden_size,), (TEXT_EMBED, None), 1, bias, **types, name="encoder_proj")(
      encoder_hidden_states
    )
    context = RMSNorm(eps, affine, **types, name="encoder_proj_norm")(context)
    context = constrain(context, (BATCH, TEXT_LENGTH, EMBED))  # [B, T, D]

    micro = timestep_embedding(micro_conds, self.micro_cond_encode_dim).reshape(b, -1)
    cond = jnp.concatenate([pooled_text_emb.astype(jnp.float32), micro], axis=-1)
    cond = Dense((self.hidden_size,), (TEXT_EMBED, None), 1, bias, **types, name="cond_linear_1")(
      cond
    )
    cond = Dense((self.hidden_size,), (EMBED, None), 1, bias, **types, name="cond_linear_2")(
      nn.silu(cond)
    )

    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), (VOCAB, EMBED)),
      (self.vocab_size, self.in_channels),
      self.param_dtype,
    )
    x = jnp.take(table, ids, axis=0)  # [B, h, w, Cin]
    x = RMSNorm(eps, affine, **types, name="embed_norm")(x)
    x = Dense((self.block_out_channels,), (EMBED, None), 1, bias, **types, name="embed_proj")(x)

    stage = lambda name, down, up: UVitStage(
      self.num_res_blocks,
      self.block_num_heads,
      down,
      up,
      eps,
      affine,
      bias,
      self.hidden_dropout,
      self.attention_dropout,
      **types,
      attention_implementation=self.attention_implementation,
      name=name,
    )
    x = stage("down_block", self.downsample, False)(x, cond, context, deterministic)

    _, y, w, c = x.shape
    x = x.reshape(b, y * w, c)
    x = RMSNorm(eps, affine, **types, name="project_to_hidden_norm")(x)
    x = Dense((self.hidden_size,), (EMBED, None), 1, bias, **types, name="project_to_hidden")(x)
    x = constrain(x, (BATCH, LENGTH, EMBED))  # [B, L, D]
    x = self._transformer(x, context, cond, deterministic)
    x = constrain(x, (BATCH, LENGTH, EMBED))
    x = RMSNorm(eps, affine, **types, name="project_from_hidden_norm")(x)
    x = Dense((c,), (EMBED, None), 1, bias, **types, name="project_from_hidden")(x)
    x = x.reshape(b, y, w, c)

    x = stage("up_block", False, self.upsample)(x, cond, context, deterministic)

    x = Dense((self.in_channels,), (EMBED, None), 1, bias, **types, name="mlm_conv1")(x)
    x = RMSNorm(eps, affine, **types, name="mlm_norm")(x)
    logits = Dense(  # float32 out: rounding logits to bfloat16 would perturb the sampling
      (self.codebook_size,),
      (EMBED, VOCAB),
      1,
      bias,
      **types,
      out_dtype=jnp.float32,
      name="mlm_conv2",
    )(x)
    return constrain(logits, (BATCH, None, None, None))  # [B, h, w, K]

  def _transformer(
    self, x: jax.Array, context: jax.Array, cond: jax.Array, deterministic: bool
  ) -> jax.Array:
    kwargs = dict(
      num_heads=self.num_attention_heads,
      intermediate_size=self.intermediate_size,
      eps=self.layer_norm_eps,
      use_scale=self.ln_elementwise_affine,
      use_bias=self.use_bias,
      dropout_rate=self.hidden_dropout,
      deterministic=deterministic,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      attention_implementation=self.attention_implementation,
    )
    return apply_layers(
      TransformerLayer, kwargs, self.num_hidden_layers, self.scan_layers, x, context, cond
    )
