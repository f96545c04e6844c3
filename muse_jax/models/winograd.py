"""A 3x3 convolution (stride 1, one pixel of zero padding) by Winograd's F(2x2, 3x3).

Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", §4: each 2x2 block
of outputs is read from a 4x4 tile of the input d (overlapping its neighbours by 2) as

  Y = Aᵀ [ Σ_C (G g Gᵀ) ⊙ (Bᵀ d B) ] A

with g the 3x3 kernel of one (input, output) channel pair. The channel sum of the 16
element-wise products is, for each tile position (a, b), one matrix product over the
channels: ``V[a, b] [P, C] @ U[a, b] [C, O]`` for the P tiles. So 16 products of P x C x O
do the work of a direct convolution's 36 (2.25x fewer), and they are plain matrix
products, which XLA's CPU backend runs on AMX and AVX512-BF16 (oneDNN) in bfloat16,
where it has no such path for convolutions.

On 2 Intel Xeon cores with AMX (2026-12-07), one conv [1, H, W, C] -> C, the kernel
transformed in the call, against XLA's float32 convolution:

  | H x W x C     | XLA     | Winograd, float32 | bfloat16 products |
  | 16x16x768     | 14.5 ms | 12.7 ms           |  8.1 ms           |
  | 32x32x512     | 20.0    | 12.5              |  5.3              |
  | 64x64x256     | 16.5    | 11.8              |  4.8              |
  | 128x128x256   | 72.0    | 46.7              | 17.4              |
  | 256x256x128   | 74.5    | 62.5              | 36.8              |

The transforms add and subtract in float32 with coefficients 0, ±1, ±1/2, so the float32
form matches the direct one to ~6e-7 (relative), and the bfloat16 one to bfloat16's
rounding of its operands, ~4e-3. XLA's batched product ([16, P, C] @ [16, C, O]) runs 3-5x
slower on a CPU than 16 separate ones, hence the 16 einsums; tiles of rows in a
``lax.map``, to keep each tile's work in cache, ran slower than the whole image at once.

Shapes: B batch, H/W pixels (Y/X = H/2, W/2 tiles), C input channels, O output channels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# G [4, 3]: the kernel transform, U = G g Gᵀ (float32; the ±1/2 are exact).
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)


def _input_transform(d0: Array, d1: Array, d2: Array, d3: Array) -> tuple[Array, ...]:
  """Bᵀ applied along one axis to the 4 rows (or columns) of a tile: 4 combinations."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _output_transform(m0: Array, m1: Array, m2: Array, m3: Array) -> tuple[Array, Array]:
  """Aᵀ applied along one axis: the 4 transformed rows (or columns) to 2 outputs."""
  return m0 + m1 + m2, m1 - m2 - m3


def transform_kernel(kernel: Array, dtype: Dtype = jnp.float32) -> Array:
  """[3, 3, C, O] -> U = G g Gᵀ, [4, 4, C, O], computed in float32 and stored in ``dtype``.

  As sums of the kernel's 9 taps weighted by G's constant entries, which XLA fuses into
  one pass over the kernel; as an einsum it ran as 16 products 4 wide, ~10x slower.
  """
  g = kernel.astype(jnp.float32)
  rows = [sum(float(_G[a, i]) * g[i] for i in range(3) if _G[a, i]) for a in range(4)]
  u = [[sum(float(_G[b, j]) * r[j] for j in range(3) if _G[b, j]) for b in range(4)] for r in rows]
  return jnp.stack([jnp.stack(ub) for ub in u]).astype(dtype)


def conv3x3(x: Array, kernel: Array, product_dtype: Dtype = jnp.float32) -> Array:
  """``conv(x, kernel)``, 3x3, stride 1, zero padding 1, by Winograd F(2x2, 3x3).

  Args:
    x: [B, H, W, C]; an odd H or W is padded by a row or column and cropped back.
    kernel: [3, 3, C, O] (HWIO, as ``nn.Conv``'s).
    product_dtype: the dtype of the 16 matrix products' operands (the transformed tiles
      and kernels); their sums and the transforms run in float32.

  Returns:
    [B, H, W, O] float32.
  """
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(
      f"conv3x3 takes x [B, H, W, C] and a kernel [3, 3, C, O]; got {tuple(x.shape)} and"
      f" {tuple(kernel.shape)}"
    )
  b, h, w, _ = x.shape
  y_tiles, x_tiles = -(-h // 2), -(-w // 2)
  # One pixel of zero padding, plus one more at the end of an odd side.
  xp = jnp.pad(
    x.astype(jnp.float32), ((0, 0), (1, 1 + h % 2), (1, 1 + w % 2), (0, 0))
  )  # [B, 2Y + 2, 2X + 2, C]
  u = transform_kernel(kernel, product_dtype)  # [4, 4, C, O]
  # Row r of every tile is the padded image's rows r, r + 2, r + 4, ...: Bᵀ over the rows,
  # then over the columns, gives the 16 transformed tiles V[a][b].
  rows = _input_transform(*(xp[:, r : r + 2 * y_tiles : 2] for r in range(4)))  # [B, Y, 2X + 2, C]
  m = []  # m[a][b]: [B, Y, X, O], the channel sums at tile position (a, b)
  for a, row in enumerate(rows):
    cols = _input_transform(*(row[:, :, s : s + 2 * x_tiles : 2] for s in range(4)))  # [B, Y, X, C]
    m.append([
      jnp.einsum(
        "BYXC,CO->BYXO", v.astype(product_dtype), u[a, bb], preferred_element_type=jnp.float32
      )
      for bb, v in enumerate(cols)
    ])  # fmt: skip
  # Aᵀ over a, then over b: out[p][q] is output pixel (2i + p, 2j + q) of tile (i, j).
  over_a = [_output_transform(*(m[a][bb] for a in range(4))) for bb in range(4)]
  out = [_output_transform(*(over_a[bb][p] for bb in range(4))) for p in range(2)]
  y = jnp.stack([jnp.stack(out[p], axis=3) for p in range(2)], axis=2)  # [B, Y, p, X, q, O]
  return y.reshape(b, 2 * y_tiles, 2 * x_tiles, -1)[:, :h, :w]


class Conv3x3(nn.Module):
  """``nn.Conv(features, (3, 3), padding=1)`` computed by ``conv3x3``: the same parameters
  (``kernel`` [3, 3, C, O], ``bias`` [O]), so weights load and checkpoints restore alike.

  The kernel is transformed in every call: a few ms for a 768 x 768 one on 2 CPU cores,
  which the conv still repays at aMUSEd's lowest resolution, 16x16 (the module docstring).
  """

  features: int  # O
  dtype: Dtype = jnp.float32  # output dtype
  product_dtype: Dtype = jnp.float32  # the products' operands; sums in float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, O]
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    y = conv3x3(x, kernel, self.product_dtype) + bias.astype(jnp.float32)
    return y.astype(self.dtype)
