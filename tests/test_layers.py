"""Attention (full, masked, multi-axis), blocks, scan / remat equivalence, axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import layers, stack

GRID = (8, 8)
WINDOW = 4


def _window_ids(kind):
  """Group id of each position in row-major order, computed independently."""
  h, w = GRID
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  if kind == "block":
    return ((r // WINDOW) * (w // WINDOW) + c // WINDOW).ravel()
  return ((r % (h // WINDOW)) * (w // WINDOW) + c % (w // WINDOW)).ravel()


@pytest.mark.parametrize("kind", ["block", "grid"])
def test_windows_partition_the_grid(kind):
  positions = jnp.arange(64.0).reshape(1, 64, 1, 1)
  groups = layers._to_windows(positions, GRID, WINDOW, kind)  # [G, P*P, 1, 1]
  assert groups.shape == (4, 16, 1, 1)
  got = np.asarray(groups[..., 0, 0]).astype(int)
  assert sorted(got.ravel()) == list(range(64))  # each position exactly once
  ids = _window_ids(kind)
  for group in got:
    assert len(set(ids[group])) == 1  # one group = one window of the reference
  back = layers._from_windows(groups, 1, GRID, WINDOW, kind)
  np.testing.assert_array_equal(back, positions)


def _reference_attention(q, k, v, allowed):
  logits = np.einsum("blnh,bsnh->bnls", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnls,bsnh->blnh", p, v)


def test_multi_axis_equals_masked_full_attention():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 64, 4, 8)).astype(np.float32) for _ in range(3))
  got = layers.multi_axis_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), GRID, WINDOW)
  for heads, kind in ((slice(0, 2), "block"), (slice(2, 4), "grid")):
    ids = _window_ids(kind)
    allowed = ids[:, None] == ids[None, :]  # [L, S]
    want = _reference_attention(q[:, :, heads], k[:, :, heads], v[:, :, heads], allowed)
    np.testing.assert_allclose(got[:, :, heads], want, rtol=1e-4, atol=1e-5)


def test_cross_attention_ignores_padding():
  attn = layers.Attention(num_heads=2, head_dim=4)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  memory = rng.normal(size=(2, 6, 8)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  params = attn.init(jax.random.key(0), x, jnp.asarray(memory), jnp.asarray(mask))
  out = attn.apply(params, x, jnp.asarray(memory), jnp.asarray(mask))
  garbage = np.where(mask[..., None], memory, 1e3)
  out2 = attn.apply(params, x, jnp.asarray(garbage), jnp.asarray(mask))
  np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-5)
  out3 = attn.apply(params, x, jnp.asarray(garbage), jnp.ones((2, 6), bool))
  assert not np.allclose(out, out3)


def _stack(scan, remat="none", attention="full"):
  return stack.BlockStack(
    num_layers=3,
    num_heads=2,
    head_dim=4,
    mlp_dim=16,
    attention=attention,
    grid=(4, 4),
    window=2,
    scan=scan,
    remat_policy=remat,
  )


@pytest.fixture(scope="module")
def stack_inputs():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  memory = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  return x, memory, jnp.ones((2, 3), bool)


def test_scan_equals_loop_and_remat_keeps_gradients(stack_inputs):
  x, memory, mask = stack_inputs
  scanned = _stack(scan=True)
  params = scanned.init(jax.random.key(0), x, memory, mask)["params"]
  boxed_kernel = params["layers"]["mlp"]["wi"]["kernel"]
  assert boxed_kernel.names == (stack.LAYERS, layers.EMBED, layers.MLP)
  params = nn.meta.unbox(params)
  # The same weights as separate layers.
  loop_params = {
    f"layers_{i}": jax.tree.map(lambda p, i=i: p[i], params["layers"]) for i in range(3)
  }
  out_scan = jax.jit(scanned.apply)({"params": params}, x, memory, mask)
  out_loop = jax.jit(_stack(scan=False).apply)({"params": loop_params}, x, memory, mask)
  np.testing.assert_allclose(out_scan, out_loop, rtol=1e-5, atol=1e-5)

  def loss(p, module):
    return jnp.sum(module.apply({"params": p}, x, memory, mask) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g = grad(params, scanned)
  g_remat = grad(params, _stack(scan=True, remat="full"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_remat)


def test_every_parameter_has_logical_axes(stack_inputs):
  x, memory, mask = stack_inputs
  abstract = jax.eval_shape(
    _stack(scan=False, attention="multi_axis").init, jax.random.key(0), x, memory, mask
  )
  leaves = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for v in leaves:
    assert len(v.names) == v.value.ndim


def test_bad_settings_are_reported():
  with pytest.raises(ValueError, match="window 3 must divide"):
    layers.Attention(num_heads=2, head_dim=4, kind="multi_axis", grid=(4, 4), window=3).init(
      jax.random.key(0), jnp.zeros((1, 16, 8))
    )
  with pytest.raises(ValueError, match="remat policy"):
    _stack(scan=False, remat="some").init(
      jax.random.key(0), jnp.zeros((1, 16, 8)), jnp.zeros((1, 3, 8))
    )


def test_relative_offsets_index_the_offset_table():
  h, w = 3, 4
  index = layers.relative_offsets((h, w))
  assert index.shape == (h * w, h * w)
  for i in range(h * w):
    for j in range(h * w):
      dy, dx = i // w - j // w, i % w - j % w
      assert index[i, j] == (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
  assert index.min() == 0 and index.max() == (2 * h - 1) * (2 * w - 1) - 1


def _relative_attention(h, w):
  return layers.Attention(num_heads=2, head_dim=4, grid=(h, w), relative_position=True)


def test_relative_bias_starts_at_zero_and_is_plain_attention_then():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
  params = nn.meta.unbox(_relative_attention(3, 4).init(jax.random.key(0), x)["params"])
  table = params.pop("relative_bias")
  assert table.shape == (5 * 7, 2) and not np.any(table)
  plain = layers.Attention(num_heads=2, head_dim=4).apply({"params": params}, x)
  np.testing.assert_array_equal(
    _relative_attention(3, 4).apply({"params": {**params, "relative_bias": table}}, x), plain
  )


def test_relative_bias_points_every_token_at_the_same_neighbour():
  """With zero keys the logits are the bias alone; one large entry at offset (dy, dx) =
  (1, 0) makes every query below the first row copy the token right above it."""
  h, w = 3, 4
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, h * w, 8)), jnp.float32)
  attn = _relative_attention(h, w)
  params = nn.meta.unbox(attn.init(jax.random.key(0), x)["params"])
  params["key"]["kernel"] = jnp.zeros_like(params["key"]["kernel"])
  above = (1 + h - 1) * (2 * w - 1) + (0 + w - 1)
  params["relative_bias"] = params["relative_bias"].at[above].set(50.0)
  got = attn.apply({"params": params}, x)  # [B, L, D]
  value = jnp.einsum("BLD,DNH->BLNH", x, params["value"]["kernel"]) + params["value"]["bias"]
  out = params["out"]
  want = jnp.einsum("BLNH,NHD->BLD", value[:, :-w], out["kernel"]) + out["bias"]  # row above
  np.testing.assert_allclose(got[:, w:], want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got[:, :w], want[:, :w], atol=1e-2)  # the first row has none above


def test_relative_bias_needs_full_self_attention_over_a_grid():
  x = jnp.zeros((1, 16, 8))
  with pytest.raises(ValueError, match="relative position bias needs full self-attention"):
    layers.Attention(num_heads=2, head_dim=4, relative_position=True).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="kind='multi_axis'"):
    layers.Attention(
      num_heads=2, head_dim=4, kind="multi_axis", grid=(4, 4), window=2, relative_position=True
    ).init(jax.random.key(0), x)


def test_depthwise_conv3x3_is_xlas_depthwise_convolution():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4)), jnp.float32)
  want = jax.lax.conv_general_dilated(
    x, kernel[:, :, None], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=4,
  )  # fmt: skip
  got = layers.depthwise_conv3x3(x, kernel[:, :, None])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # bfloat16 in, bfloat16 out, summed in float32: the float32 result rounded once.
  xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  got = layers.depthwise_conv3x3(xb, kb[:, :, None])
  assert got.dtype == jnp.bfloat16
  exact = layers.depthwise_conv3x3(xb.astype(jnp.float32), kb[:, :, None].astype(jnp.float32))
  np.testing.assert_array_equal(got, exact.astype(jnp.bfloat16))


def test_grid_conv_starts_as_the_identity_and_reaches_only_neighbours():
  grid = (4, 5)
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 20, 8)), jnp.float32)
  conv = layers.GridConv(grid)
  params = nn.meta.unbox(conv.init(jax.random.key(0), x)["params"])
  assert params["kernel"].shape == (3, 3, 8) and not np.any(params["kernel"])
  np.testing.assert_array_equal(conv.apply({"params": params}, x), x)
  params["kernel"] = jnp.asarray(rng.normal(size=(3, 3, 8)), jnp.float32)
  y = conv.apply({"params": params}, x)
  token = 2 * 5 + 2  # row 2, column 2
  y2 = conv.apply({"params": params}, x.at[:, token].add(1.0))
  changed = np.asarray(jnp.abs(y2 - y).max(axis=(0, 2)) > 1e-6).reshape(grid)
  want = np.zeros(grid, bool)
  want[1:4, 1:4] = True  # the 3x3 neighbourhood of (2, 2)
  np.testing.assert_array_equal(changed, want)
  with pytest.raises(ValueError, match=r"conv grid \(4, 5\) holds 20 tokens; got 16"):
    conv.init(jax.random.key(0), x[:, :16])


def test_local_conv_starts_as_the_plain_block_and_convolves_both_inputs():
  grid = (4, 5)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 20, 8)), jnp.float32)
  kw = dict(num_heads=2, head_dim=4, mlp_dim=16, cross_attention=False, grid=grid)
  block = layers.TransformerBlock(local_conv=True, **kw)
  params = nn.meta.unbox(block.init(jax.random.key(0), x)["params"])
  assert params["conv_self"]["kernel"].shape == params["conv_mlp"]["kernel"].shape == (3, 3, 8)
  plain = {k: v for k, v in params.items() if not k.startswith("conv_")}
  want, _ = layers.TransformerBlock(**kw).apply({"params": plain}, x)
  got, _ = block.apply({"params": params}, x)
  np.testing.assert_array_equal(got, want)
  for name in ("conv_self", "conv_mlp"):  # each one, alone, changes the output
    moved = dict(params, **{name: {"kernel": jnp.full((3, 3, 8), 0.1, jnp.float32)}})
    assert float(jnp.abs(block.apply({"params": moved}, x)[0] - want).max()) > 1e-3
  with pytest.raises(ValueError, match="local_conv convolves over the token grid"):
    layers.TransformerBlock(**dict(kw, grid=None), local_conv=True).init(jax.random.key(0), x)
