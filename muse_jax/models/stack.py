"""Stacks of transformer blocks: ``nn.scan`` over stacked layers, or unrolled.

``BlockStack`` runs the masked transformer's blocks (``layers.TransformerBlock``), with
optional activation rematerialisation; ``apply_layers`` is the stacking itself, shared
with the U-ViT's layers (``models.uvit``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.layers import Dtype, TransformerBlock
from muse_jax.partitioning import LAYERS

REMAT_POLICIES = {
  "none": None,  # Keep every activation (fastest, most memory).
  "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole block.
  "dots": jax.checkpoint_policies.checkpoint_dots,  # Keep matmul outputs.
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Keep projections.
}


class BlockStack(nn.Module):
  """``num_layers`` transformer blocks, optionally scanned and rematerialised.

  With ``scan`` the blocks' parameters are stacked on a leading ``LAYERS`` axis
  (one compiled block body, fast compiles at depth 48); without it they are
  ``layers_0 ... layers_{n-1}``.
  """

  num_layers: int = 2  # Depth.
  num_heads: int = 8  # N.
  head_dim: int = 64  # H.
  mlp_dim: int = 2048  # F.
  cross_attention: bool = True  # Blocks attend to the memory.
  attention: str = "full"  # Self-attention kind.
  grid: tuple[int, int] | None = None  # Token grid (multi-axis, relative bias, conv).
  window: int = 8  # Multi-axis block / grid side.
  relative_position: bool = False  # 2D relative position bias in the self-attention.
  local_conv: bool = False  # Depthwise 3x3 convolutions on the self-attention and MLP inputs.
  dropout_rate: float = 0.0  # Dropout rate.
  deterministic: bool = True  # Disables dropout.
  scan: bool = True  # nn.scan over layers.
  remat_policy: str = "none"  # One of REMAT_POLICIES.
  dtype: Dtype = jnp.float32  # Computation dtype.
  param_dtype: Dtype = jnp.float32  # Parameter dtype.

  @nn.compact
  def __call__(
    self, x: jax.Array, memory: jax.Array | None = None, memory_mask: jax.Array | None = None
  ) -> jax.Array:
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"unknown remat policy {self.remat_policy!r}; expected one of {list(REMAT_POLICIES)}"
      )
    block_cls = TransformerBlock
    if self.remat_policy != "none":
      block_cls = nn.remat(
        TransformerBlock, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan
      )
    fields = dict(
      num_heads=self.num_heads,
      head_dim=self.head_dim,
      mlp_dim=self.mlp_dim,
      cross_attention=self.cross_attention,
      attention=self.attention,
      grid=self.grid,
      window=self.window,
      relative_position=self.relative_position,
      local_conv=self.local_conv,
      dropout_rate=self.dropout_rate,
      deterministic=self.deterministic,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    return apply_layers(block_cls, fields, self.num_layers, self.scan, x, memory, memory_mask)


def apply_layers(
  block_cls: type[nn.Module], fields: dict[str, Any], num_layers: int, scan: bool, x, *args
) -> jax.Array:
  """Runs ``num_layers`` blocks ``block_cls(**fields)(x, *args) -> (x, None)`` in turn.

  Call it from a compact method: the blocks become the caller's children. With ``scan``,
  one ``nn.scan`` named ``layers`` whose parameters are stacked on a leading ``LAYERS``
  axis (one compiled body; the args reach every layer unchanged); without it, unrolled
  blocks ``layers_0 ... layers_{n-1}``, which lets XLA hoist what each layer computes from
  the args alone (its cross-attention keys and values) out of a decode loop.
  """
  if scan:
    stack = nn.scan(
      block_cls,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * len(args),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: LAYERS},
    )
    x, _ = stack(**fields, name="layers")(x, *args)
    return x
  for i in range(num_layers):
    x, _ = block_cls(**fields, name=f"layers_{i}")(x, *args)
  return x
