"""LPIPS perceptual distance on VGG16 features (Zhang et al. 2018), for the VQGAN loss.

Muse's tokenizer loss includes a perceptual term (weight 0.05, App. A.2). LPIPS:

  x -> (x - shift) / scale  (the "ScalingLayer", inputs in [-1, 1])
  VGG16 ``features`` up to relu5_3; taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  per tap: unit-normalise over channels, squared difference, 1x1 "lin" weights (>= 0),
  spatial mean; sum over taps.

Without trained ``lin`` weights (``use_lin=False``) each tap is a plain channel mean,
the "VGG perceptual" baseline. Weights are never downloaded: ``muse_jax.convert.lpips``
reads them from a local safetensors file (torchvision names ``features.{i}.weight`` and
LPIPS names ``lin{k}.model.1.weight``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision vgg16().features: conv layer indices, their widths, and the max-pools.
VGG16_CONVS = (
  (0, 64),
  (2, 64),
  (5, 128),
  (7, 128),
  (10, 256),
  (12, 256),
  (14, 256),
  (17, 512),
  (19, 512),
  (21, 512),
  (24, 512),
  (26, 512),
  (28, 512),
)
VGG16_POOL_AFTER = (2, 7, 14, 21)  # max-pool after these convs (indices 4, 9, 16, 23)
LPIPS_TAPS = (2, 7, 14, 21, 28)  # relu after these convs: relu1_2 ... relu5_3
_SHIFT = jnp.array([-0.030, -0.088, -0.188])
_SCALE = jnp.array([0.458, 0.448, 0.450])


class VGG16Features(nn.Module):
  """The LPIPS taps of torchvision's VGG16 (NHWC). Params ``features_{i}``."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for idx, width in VGG16_CONVS:
      x = nn.relu(
        nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"features_{idx}")(
          x
        )
      )
      if idx in LPIPS_TAPS:
        taps.append(x)
      if idx in VGG16_POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return taps


class LPIPS(nn.Module):
  """Perceptual distance per image: ``(x, y) [B, H, W, 3] in [-1, 1] -> [B]``."""

  use_lin: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    feats = VGG16Features(self.dtype, name="vgg")
    n = x.shape[0]
    both = (jnp.concatenate([x, y], 0).astype(jnp.float32) - _SHIFT) / _SCALE
    total = jnp.zeros((n,), jnp.float32)
    for k, f in enumerate(feats(both.astype(self.dtype))):
      f = f.astype(jnp.float32)
      f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
      d = jnp.square(f[:n] - f[n:])  # [B, h, w, C]
      if self.use_lin:
        w = self.param(f"lin{k}", nn.initializers.constant(1.0 / d.shape[-1]), (d.shape[-1],))
        d = jnp.einsum("BHWC,C->BHW", d, w)
      else:
        d = jnp.mean(d, axis=-1)
      total = total + jnp.mean(d, axis=(1, 2))
    return total
