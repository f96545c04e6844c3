"""VQGAN encoder/decoder: shapes, options, bad input, gradients, sharded init."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import partitioning
from muse_jax.models.subpixel import UpsampleConv
from muse_jax.models.vq_convs import PointwiseConv
from muse_jax.models.vqgan import (
  VQGAN,
  depth_to_space,
  from_unit_range,
  space_to_depth,
  to_unit_range,
  uint8_to_range,
)

TINY = dict(
  channels=(16, 32, 32), num_res_blocks=1, latent_channels=8, codebook_size=32, norm_groups=8
)


def _init(model, size=16, batch=2):
  x = jax.random.uniform(jax.random.key(0), (batch, size, size, 3), minval=-1, maxval=1)
  return nn.meta.unbox(model.init(jax.random.key(1), x)), x


@pytest.mark.parametrize(
  "kw",
  [
    dict(downsample="avgpool"),
    dict(downsample="conv", use_quant_conv=True, embed_dim=4, mid_attention=True),
    dict(decoder_channels=(32, 64, 64), decoder_num_res_blocks=3, l2_normalize=True),
  ],
)
def test_shapes_and_consistency(kw):
  model = VQGAN(**TINY, **kw)
  v, x = _init(model)
  recon, aux = model.apply(v, x)
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  ids = model.apply(v, x, method=model.encode)
  assert ids.shape == (2, 4, 4) and model.downsample_factor == 4
  np.testing.assert_array_equal(ids, aux["ids"])
  # decode(encode(x)) is the forward pass's reconstruction.
  np.testing.assert_allclose(model.apply(v, ids, method=model.decode), recon, atol=1e-5)
  assert aux["z"].shape == (2, 4, 4, model.code_dim)
  for k in ("quantizer_loss", "codebook_usage", "perplexity"):
    assert np.isfinite(float(aux[k]))


def test_patch_stem_folds_pixels_into_channels():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  folded = space_to_depth(x, 4)  # [2, 2, 2, 48]
  assert folded.shape == (2, 2, 2, 48)
  # Token (1, 0) of image 1 is the 4x4 patch at rows 4..7, columns 0..3, row-major.
  np.testing.assert_array_equal(folded[1, 1, 0], x[1, 4:8, 0:4].reshape(-1))
  np.testing.assert_array_equal(depth_to_space(folded, 4), x)

  model = VQGAN(**TINY, patch_size=2)  # f = 2 * 2^2 = 8
  v, x = _init(model)
  recon, aux = model.apply(v, x)
  assert model.downsample_factor == 8 and recon.shape == x.shape
  assert aux["ids"].shape == (2, 2, 2)
  assert v["params"]["encoder"]["conv_in"]["kernel"].shape[2] == 12  # 2·2·3 input channels
  np.testing.assert_allclose(model.apply(v, aux["ids"], method=model.decode), recon, atol=1e-5)


def test_decoder_finetune_shares_encoder_and_codebook_shapes():
  small = VQGAN(**TINY)
  big = VQGAN(**TINY, decoder_channels=(32, 64, 64), decoder_num_res_blocks=4)
  vs, _ = _init(small)
  vb, _ = _init(big)
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  assert shapes(vs["params"]["encoder"]) == shapes(vb["params"]["encoder"])
  assert shapes(vs["params"]["quantize"]) == shapes(vb["params"]["quantize"])
  n = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert n(vb["params"]["decoder"]) > 3 * n(vs["params"]["decoder"])


def test_gradients_reach_encoder_through_the_quantizer():
  model = VQGAN(**TINY)
  v, x = _init(model)

  def loss(p):
    recon, aux = model.apply({"params": p}, x)
    return jnp.mean((recon - x) ** 2) + aux["quantizer_loss"]

  g = jax.jit(jax.grad(loss))(v["params"])
  for part in ("encoder", "decoder", "quantize"):
    assert float(sum(jnp.abs(t).sum() for t in jax.tree.leaves(g[part]))) > 0, part


@pytest.mark.parametrize(
  "x, match",
  [
    (jnp.zeros((2, 16, 16, 4)), r"4 channels.*expected 3"),
    (jnp.zeros((2, 18, 16, 3)), r"18x16 is not a multiple of the downsampling factor 4"),
    (jnp.zeros((2, 16, 16, 3), jnp.uint8), r"dtype uint8; expected floats"),
    (jnp.zeros((16, 16, 3)), r"\[B, H, W, C\].*\(16, 16, 3\)"),
  ],
)
def test_bad_images_name_found_and_expected(x, match):
  model = VQGAN(**TINY)
  v, _ = _init(model)
  with pytest.raises(ValueError, match=match):
    model.apply(v, x, method=model.encode)


def test_bad_options():
  with pytest.raises(ValueError, match="not divisible by norm_groups"):
    _init(VQGAN(**{**TINY, "channels": (12, 32, 32)}))
  with pytest.raises(ValueError, match="use_quant_conv"):
    _init(VQGAN(**TINY, embed_dim=4))
  with pytest.raises(ValueError, match="'avgpool' or 'conv'"):
    _init(VQGAN(**TINY, downsample="max"))


def _plain_upsample_conv(params, x):
  """The reference: nearest x2, then a zero-padded 3x3 conv with the same parameters."""
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return nn.Conv(params["bias"].shape[0], (3, 3), padding=((1, 1), (1, 1))).apply(
    {"params": params}, up
  )


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_upsample_conv_equals_conv_of_the_upsampled_image(dtype, tol):
  """The sub-pixel form against nearest x2 then a zero-padded 3x3 conv, same parameters."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))  # odd sides: every border case
  module = UpsampleConv(4, dtype)
  params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
  params["bias"] = jax.random.normal(jax.random.key(2), (4,))
  assert params["kernel"].shape == (3, 3, 6, 4)  # the plain conv's: weights load unchanged
  out = module.apply({"params": params}, x)
  ref = _plain_upsample_conv(params, x)
  assert out.shape == (2, 10, 14, 4) and out.dtype == dtype
  err = jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))
  assert err < tol, err


def test_upsample_conv_gradients_are_the_plain_forms():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  module = UpsampleConv(4)
  params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
  target = jax.random.normal(jax.random.key(2), (2, 10, 14, 4))
  loss = lambda f: jax.grad(lambda p, x: jnp.sum((f(p, x) - target) ** 2), argnums=(0, 1))
  got = loss(lambda p, x: module.apply({"params": p}, x))(params, x)
  want = loss(_plain_upsample_conv)(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pointwise_conv_is_a_1x1_conv(dtype):
  """Same parameters as nn.Conv's 1x1 (checkpoints load either way), same outputs."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  module = PointwiseConv(4, dtype)
  params = nn.meta.unbox(module.init(jax.random.key(1), x)["params"])
  params["bias"] = jax.random.normal(jax.random.key(2), (4,))
  conv = nn.Conv(4, (1, 1), dtype=dtype)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
    jnp.shape, conv.init(jax.random.key(1), x)["params"]
  )
  out = module.apply({"params": params}, x)
  assert out.shape == (2, 5, 7, 4) and out.dtype == dtype
  np.testing.assert_allclose(
    out.astype(jnp.float32),
    conv.apply({"params": params}, x).astype(jnp.float32),
    **(dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)),
  )


def test_bf16_compute_runs():
  model = VQGAN(**TINY, dtype=jnp.bfloat16)
  v, x = _init(model)
  recon, aux = model.apply(v, x)
  assert recon.dtype == jnp.float32 and np.isfinite(np.asarray(recon)).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))


def test_range_helpers():
  u = jnp.array([0, 255], jnp.uint8)
  np.testing.assert_allclose(uint8_to_range(u), [-1, 1])
  np.testing.assert_allclose(uint8_to_range(u, (0.0, 1.0)), [0, 1])
  np.testing.assert_allclose(to_unit_range(from_unit_range(jnp.array([0.25]))), [0.25])


def test_sharded_init_and_data_parallel_forward():
  model = VQGAN(**TINY)
  mesh = partitioning.make_mesh({"data": 4, "fsdp": 2})
  x = jnp.zeros((8, 16, 16, 3))
  params, shardings = partitioning.sharded_init(
    lambda k, x: model.init(k, x), mesh, partitioning.DEFAULT_RULES, jax.random.key(0), x
  )
  flat = flax.traverse_util.flatten_dict(shardings["params"], sep="/")
  # Conv output channels are sharded over fsdp; norms are replicated.
  assert flat["encoder/conv_in/kernel"].spec[-1] == "fsdp"
  assert all(s is None for s in flat["encoder/conv_norm_out/scale"].spec)
  xs = partitioning.shard_batch(
    np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32), mesh
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
    recon, aux = jax.jit(model.apply)(params, xs)
  ref, _ = model.apply(jax.device_get(params), np.asarray(xs))
  np.testing.assert_allclose(recon, ref, atol=1e-4)
