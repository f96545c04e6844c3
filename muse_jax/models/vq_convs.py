"""How the VQGAN's convolutions compute: one factory for every conv of its encoder and
decoder, the 1x1 conv as a matrix product, and the choice of 3x3 implementation.

The 3x3 stride-1 convs run as XLA's convolutions or, with ``conv_impl="winograd"``, by
Winograd's F(2x2, 3x3) on matrix products (``models/winograd.py``); ``conv_dtype`` is the
operand dtype of those products and of the 1x1 convs' (sums in float32). The parameters
are ``nn.Conv``'s either way, so weights load and checkpoints restore alike.
``fast_convs`` picks the faster for a device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax import cpu_features
from muse_jax.models.winograd import Conv3x3
from muse_jax.partitioning import CONV_IN, CONV_OUT

Array = jax.Array
Dtype = Any

# How the 3x3 stride-1 convs run: XLA's convolution, or Winograd F(2x2, 3x3) on matrix
# products (models/winograd.py): aMUSEd's decoder on a CPU 1.2x faster in float32, 1.8x
# with bfloat16 products (fast_convs).
CONV_IMPLS = ("xla", "winograd")


class PointwiseConv(nn.Module):
  """A 1x1 conv as one matmul over the channels, with ``nn.Conv``'s parameters (kernel
  ``[1, 1, C, O]``, bias ``[O]``). XLA's CPU convolution runs a 1x1 kernel at a fraction
  of its matmul rate: aMUSEd's 256 -> 128 shortcut at 256x256 takes 55 ms as a conv and
  33 ms as this einsum on 2 cores."""

  features: int  # O
  dtype: Dtype = jnp.float32  # computation dtype
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  product_dtype: Dtype | None = None  # the product's operands, summed in float32; None: dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [..., C] -> [..., O]
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    if self.product_dtype is None:
      x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
      return jnp.einsum("...C,CO->...O", x, kernel[0, 0]) + bias
    y = jnp.einsum(
      "...C,CO->...O",
      x.astype(self.product_dtype),
      kernel[0, 0].astype(self.product_dtype),
      preferred_element_type=jnp.float32,
    )
    return (y + bias.astype(jnp.float32)).astype(self.dtype)


def conv_layer(
  features: int,
  k: int,
  name: str,
  dtype: Dtype,
  stride: int = 1,
  padding: Any = None,
  shard: bool = True,
  conv_impl: str = "xla",
  conv_dtype: Dtype | None = None,
) -> nn.Module:
  """A conv whose output channels are sharded over ``CONV_OUT`` unless ``shard`` is False
  (the narrow convs to pixels and latents: 3 or 8 channels do not split over a mesh).

  ``conv_impl="winograd"`` computes a 3x3 stride-1 conv by ``winograd.Conv3x3``;
  ``conv_dtype`` is the operand dtype of that conv's products and of a 1x1 conv's (sums in
  float32; None: ``dtype``). Other convs are XLA's, in ``dtype``.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}; got {conv_impl!r}")
  pad = k // 2
  out_axis = CONV_OUT if shard else None
  kernel_init = nn.with_logical_partitioning(
    nn.initializers.lecun_normal(), (None, None, CONV_IN, out_axis)
  )
  bias_init = nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,))
  if k == 1 and stride == 1 and padding is None:
    return PointwiseConv(features, dtype, kernel_init, bias_init, conv_dtype, name=name)
  if k == 3 and stride == 1 and padding is None and conv_impl == "winograd":
    return Conv3x3(features, dtype, conv_dtype or dtype, kernel_init, bias_init, name=name)
  return nn.Conv(
    features,
    (k, k),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)) if padding is None else padding,
    dtype=dtype,
    kernel_init=kernel_init,
    bias_init=bias_init,
    name=name,
  )


def fast_convs(dtype: Dtype, device: jax.Device | None = None) -> dict[str, Any]:
  """The faster ``conv_impl`` and ``conv_dtype`` for products in ``dtype`` on a device
  (default: JAX's first), as ``Tokenizer.with_convs`` takes them.

  On a CPU, Winograd, with products in ``dtype`` where the CPU multiplies bfloat16 in
  hardware (``cpu_features``) and in float32 where it does not: XLA's CPU convolutions use
  neither AMX nor AVX512-BF16, its matrix products do. aMUSEd's decoder (16x16 ids to a
  256x256 image), ``benchmarks/vq_speed.py --no_torch``, 2026-12-07:

  | convolutions                | 2 Intel Xeon cores (AMX) | 2 AMD Zen 3 cores (AVX2) |
  |-----------------------------|--------------------------|--------------------------|
  | XLA's, float32              | 1.81 s                   | 3.15 s                   |
  | Winograd, float32 products  | 1.48 s                   | 2.49 s                   |
  | Winograd, bfloat16 products | 1.03 s                   | 2.91 s                   |

  Float32 Winograd is within 2.4e-6 of XLA's convolutions (relative), bfloat16 products
  within 1.2e-2. Elsewhere XLA's convolutions, computing in the VQGAN's ``dtype``.
  """
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    return dict(conv_impl="xla", conv_dtype=None)
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16 and cpu_features.converts_bf16(device):
    dtype = jnp.dtype(jnp.float32)
  return dict(conv_impl="winograd", conv_dtype=dtype)
