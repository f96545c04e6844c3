"""Winograd F(2x2, 3x3) convolution: equal to XLA's conv, same parameters, and the VQGAN's
convs computed by it (``conv_impl="winograd"``) in float32 and with bfloat16 products."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import partitioning
from muse_jax.models import vq_convs, winograd
from muse_jax.models.vq_convs import fast_convs
from muse_jax.models.vqgan import VQGAN
from muse_jax.vq_tokenizer import Tokenizer

_NHWC = ("NHWC", "HWIO", "NHWC")
TINY = dict(
  channels=(16, 32, 32), num_res_blocks=1, latent_channels=8, codebook_size=32, norm_groups=8
)


def _xla_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _relative_error(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (1, 7, 9, 3), (1, 1, 1, 4), (3, 2, 5, 8)])
def test_conv3x3_equals_xla_conv(shape):
  """Even and odd sides, one pixel, C != O: the float32 form equals the direct conv."""
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 6))
  out = jax.jit(winograd.conv3x3)(x, kernel)
  assert out.shape == (*shape[:3], 6) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _xla_conv(x, kernel), rtol=1e-5, atol=1e-5)


def test_conv3x3_bfloat16_products_round_like_bfloat16():
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 64))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 64, 32)) / 24
  ref = _xla_conv(x, kernel)
  err = _relative_error(winograd.conv3x3(x, kernel, jnp.bfloat16), ref)
  assert 1e-4 < err < 1e-2  # bfloat16's rounding of the operands (2^-8), not float32's


def test_kernel_transform_is_g_g_gt():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 5))
  g = winograd._G
  np.testing.assert_allclose(
    winograd.transform_kernel(kernel), jnp.einsum("ai,ijCO,bj->abCO", g, kernel, g), atol=1e-6
  )


def test_conv3x3_gradients_equal_the_direct_convs():
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  w = jax.random.normal(jax.random.key(2), (2, 6, 5, 4))
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * w)
  got = jax.grad(loss(winograd.conv3x3), argnums=(0, 1))(x, kernel)
  want = jax.grad(loss(_xla_conv), argnums=(0, 1))(x, kernel)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_bad_shapes_name_found_and_expected():
  with pytest.raises(
    ValueError, match=r"kernel \[3, 3, C, O\]; got \(1, 4, 4, 2\) and \(3, 3, 5, 2\)"
  ):
    winograd.conv3x3(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 5, 2)))


def test_module_has_nn_convs_parameters_and_outputs():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
  conv = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1)))
  params = conv.init(jax.random.key(1), x)["params"]
  params["bias"] = jax.random.normal(jax.random.key(2), (7,))
  module = winograd.Conv3x3(7)
  assert jax.tree.map(jnp.shape, module.init(jax.random.key(1), x)["params"]) == jax.tree.map(
    jnp.shape, params
  )
  np.testing.assert_allclose(
    module.apply({"params": params}, x), conv.apply({"params": params}, x), rtol=1e-5, atol=1e-5
  )


def _vqgan_and_images():
  model = VQGAN(**TINY, downsample="conv", use_quant_conv=True, embed_dim=4)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  return model, nn.meta.unbox(model.init(jax.random.key(1), x)), x


def _apply(model, v, x, method="__call__"):
  return jax.jit(lambda v, x: model.apply(v, x, method=getattr(model, method)))(v, x)


def test_vqgan_winograd_convs_equal_xlas():
  """Same params, same reconstruction (float32), and the bfloat16 products' within bfloat16
  rounding: 1x1 convs included, the stride-2 downsampling conv left to XLA."""
  model, v, x = _vqgan_and_images()
  fast = model.clone(conv_impl="winograd")
  half = model.clone(conv_impl="winograd", conv_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(fast.init(jax.random.key(1), x)))
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, v)

  @jax.jit
  def outputs(v, x):
    (ref, aux), (got, got_aux) = model.apply(v, x), fast.apply(v, x)
    # Rounding may move a latent to another code, so both decoders get the same ids.
    decoded = [m.apply(v, aux["ids"], method=m.decode) for m in (model, half)]
    return ref, aux["z"], got, got_aux["z"], *decoded

  ref, z, got, got_z, want, out = outputs(v, x)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got_z, z, rtol=1e-4, atol=1e-4)
  assert out.dtype == jnp.float32 and 1e-4 < _relative_error(out, want) < 2e-2


def test_vqgan_winograd_sharded():
  """Output channels sharded over fsdp, batch over data: the same images as unsharded."""
  model, _, x = _vqgan_and_images()
  model = model.clone(conv_impl="winograd")
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 4})
  params, _ = partitioning.sharded_init(
    lambda k, x: model.init(k, x), mesh, partitioning.DEFAULT_RULES, jax.random.key(0), x
  )
  ids = jax.random.randint(jax.random.key(2), (2, 4, 4), 0, TINY["codebook_size"])
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    out = _apply(model, params, ids, "decode")
  ref = _apply(model, jax.device_get(params), ids, "decode")
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_bad_conv_impl():
  model, v, x = _vqgan_and_images()
  with pytest.raises(
    ValueError, match=r"conv_impl must be one of \('xla', 'winograd'\); got 'fft'"
  ):
    model.clone(conv_impl="fft").apply(v, x)


def test_fast_convs_and_tokenizer_with_convs(monkeypatch):
  cpu = jax.devices("cpu")[0]
  for units, products in ((True, jnp.bfloat16), (False, jnp.float32)):
    # bfloat16 products only where the CPU multiplies bfloat16 in hardware.
    monkeypatch.setattr(vq_convs.cpu_features, "has_bf16_products", lambda u=units: u)
    assert fast_convs(jnp.bfloat16, cpu) == dict(
      conv_impl="winograd", conv_dtype=jnp.dtype(products)
    )
    assert fast_convs(jnp.float32, cpu)["conv_dtype"] == jnp.float32
  for platform in ("gpu", "tpu"):  # XLA's own convolutions, in the VQGAN's dtype
    device = types.SimpleNamespace(platform=platform)
    assert fast_convs(jnp.bfloat16, device) == dict(conv_impl="xla", conv_dtype=None)
  model, v, _ = _vqgan_and_images()
  tok = Tokenizer(model, v["params"]).with_convs(**fast_convs(jnp.float32))
  assert tok.model.conv_impl == "winograd" and tok.params is v["params"]
  ids = jnp.arange(32).reshape(2, 4, 4) % 32
  np.testing.assert_array_equal(tok.decode(ids), Tokenizer(model, v["params"]).decode(ids))
