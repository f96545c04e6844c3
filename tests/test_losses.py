"""VQGAN losses, the perceptual network and its weight file, the discriminator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from muse_jax import losses
from muse_jax.convert.lpips import load_lpips_params
from muse_jax.models.discriminator import StyleGANDiscriminator, blur, minibatch_stddev
from muse_jax.models.perceptual import LPIPS, LPIPS_TAPS, VGG16_CONVS


def test_reconstruction_losses():
  x, y = jnp.zeros((2, 4, 4, 3)), jnp.full((2, 4, 4, 3), 0.5)
  assert float(losses.reconstruction_loss(x, y, "l1")) == 0.5
  assert float(losses.reconstruction_loss(x, y, "l2")) == 0.25
  with pytest.raises(ValueError, match="'l1' or 'l2'; got 'l3'"):
    losses.reconstruction_loss(x, y, "l3")


def test_adversarial_losses():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.0])
  # hinge: relu(1-real) = [0, .5]; relu(1+fake) = [0, 1]
  np.testing.assert_allclose(losses.discriminator_adversarial_loss(real, fake, "hinge"), 0.25 + 0.5)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake, "hinge"), 1.0)
  sp = lambda v: np.log1p(np.exp(v))
  np.testing.assert_allclose(
    losses.discriminator_adversarial_loss(real, fake, "non_saturating"),
    np.mean(sp(-np.array([2.0, 0.5]))) + np.mean(sp(np.array([-2.0, 0.0]))),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    losses.generator_adversarial_loss(fake, "non_saturating"),
    np.mean(sp(np.array([2.0, 0.0]))),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="'hinge' or 'non_saturating'"):
    losses.generator_adversarial_loss(fake, "wgan")


def test_r1_of_a_linear_discriminator_is_the_weight_norm():
  w = jax.random.normal(jax.random.key(0), (4, 4, 3))
  d = lambda x: jnp.einsum("BHWC,HWC->B", x, w)
  x = jax.random.normal(jax.random.key(1), (5, 4, 4, 3))
  np.testing.assert_allclose(losses.r1_penalty(d, x), jnp.sum(w * w), rtol=1e-5)


def test_lecam():
  ema = {"real": jnp.float32(1.0), "fake": jnp.float32(-1.0)}
  real, fake = jnp.array([0.0, 2.0]), jnp.array([0.0, -3.0])
  # relu(real - (-1))² = [1, 9]; relu(1 - fake)² = [1, 16]
  np.testing.assert_allclose(losses.lecam_loss(real, fake, ema["real"], ema["fake"]), 5.0 + 8.5)
  new = losses.lecam_update(ema, real, fake, decay=0.5)
  np.testing.assert_allclose([new["real"], new["fake"]], [1.0, -1.25])


def test_psnr():
  x = jnp.zeros((2, 4, 4, 3))
  y = x.at[1].set(0.2)
  p = losses.psnr(x, y, data_range=2.0)
  assert float(p[0]) > 90 and abs(float(p[1]) - 10 * np.log10(4 / 0.04)) < 1e-3


def _random_lpips_file(path, lin=True):
  rng = np.random.default_rng(0)
  t, cin = {}, 3
  for idx, width in VGG16_CONVS:
    t[f"features.{idx}.weight"] = (rng.normal(size=(width, cin, 3, 3)) / np.sqrt(9 * cin)).astype(
      np.float32
    )
    t[f"features.{idx}.bias"] = np.zeros(width, np.float32)
    cin = width
  if lin:
    widths = dict(VGG16_CONVS)
    for k, idx in enumerate(LPIPS_TAPS):
      t[f"lin{k}.model.1.weight"] = rng.uniform(size=(1, widths[idx], 1, 1)).astype(np.float32)
  safetensors.numpy.save_file(t, str(path))
  return t


@pytest.mark.parametrize("lin", [True, False])
def test_lpips_from_a_weights_file(tmp_path, lin):
  path = tmp_path / "lpips.safetensors"
  _random_lpips_file(path, lin)
  params, has_lin = load_lpips_params(path)
  assert has_lin == lin
  net = LPIPS(use_lin=has_lin)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  y = jnp.flip(x, axis=2)
  distance = jax.jit(lambda a, b: net.apply({"params": params}, a, b))  # op by op is slow
  d = distance(x, y)
  assert d.shape == (2,) and bool(jnp.all(d > 0))
  np.testing.assert_allclose(distance(x, x), 0.0, atol=1e-6)
  g = jax.jit(jax.grad(lambda y: distance(x, y).sum()))(y)
  assert float(jnp.abs(g).sum()) > 0


def test_lpips_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
    load_lpips_params(tmp_path / "nowhere.safetensors")
  path = tmp_path / "bad.safetensors"
  t = _random_lpips_file(path)
  t["features.2.weight"] = np.zeros((32, 64, 3, 3), np.float32)
  safetensors.numpy.save_file(t, str(path))
  with pytest.raises(
    ValueError, match=r"'features.2.weight' has shape \(32, 64, 3, 3\); expected \(64, 64, 3, 3\)"
  ):
    load_lpips_params(path)


def test_discriminator_shapes_and_gradients():
  d = StyleGANDiscriminator(channels=(16, 32, 32), stem_channels=8)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  v = nn.meta.unbox(d.init(jax.random.key(1), x))
  logits = jax.jit(d.apply)(v, x)
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  r1 = jax.jit(lambda z: losses.r1_penalty(lambda w: d.apply(v, w), z))(x)
  assert np.isfinite(float(r1)) and float(r1) > 0


def test_blur_and_minibatch_std():
  x = jnp.ones((2, 8, 8, 3))
  b = blur(x)
  assert b.shape == x.shape
  np.testing.assert_allclose(b[:, 2:-2, 2:-2], 1.0, atol=1e-6)  # the filter sums to one
  # The separable passes equal the 2D filter as one depthwise convolution.
  z = jax.random.normal(jax.random.key(1), (2, 9, 7, 3))
  k = np.outer([1.0, 3.0, 3.0, 1.0], [1.0, 3.0, 3.0, 1.0]) / 64.0
  ref = jax.lax.conv_general_dilated(
    z, jnp.tile(jnp.asarray(k, jnp.float32)[:, :, None, None], (1, 1, 1, 3)), (1, 1),
    ((1, 2), (1, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3,
  )  # fmt: skip
  np.testing.assert_allclose(blur(z), ref, atol=1e-6)
  y = minibatch_stddev(jax.random.normal(jax.random.key(0), (8, 4, 4, 5)), group=4)
  assert y.shape == (8, 4, 4, 6)
  np.testing.assert_allclose(minibatch_stddev(x, 4)[..., -1], 1e-4, rtol=1e-3)  # no spread
