"""Optimizers: schedule shape, Adafactor math, Muon's matrices, state sharding, accumulation."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers as Muon
import pytest

from muse_jax import optim, partitioning


def _config(**overrides):
  c = ml_collections.ConfigDict(
    dict(
      name="adafactor",
      lr=1e-4,
      warmup_steps=5,
      schedule="cosine",
      end_lr_factor=0.0,
      b1=0.9,
      b2=0.96,
      weight_decay=0.045,
      grad_clip_norm=1.0,
    )
  )
  c.update(overrides)
  return c


def test_warmup_cosine():
  s = optim.warmup_cosine(2.0, total_steps=20, warmup_steps=4, end_factor=0.1)
  np.testing.assert_allclose([s(0), s(2), s(4)], [0.0, 1.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(s(12), 0.2 + 1.8 * 0.5, rtol=1e-5)  # half-way through the decay
  np.testing.assert_allclose(s(20), 0.2, rtol=1e-5)
  c = optim.warmup_cosine(1.0, 10, 2, schedule="constant")
  np.testing.assert_allclose([c(1), c(2), c(9)], [0.5, 1.0, 1.0])
  with pytest.raises(ValueError, match="linear"):
    optim.warmup_cosine(1.0, 10, schedule="linear")


def test_factored_rms_matches_bias_corrected_ema():
  beta2 = 0.96
  tx = optim.scale_by_factored_rms(beta2, eps=0.0, min_dim_size_to_factor=4)
  params = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}
  state = tx.init(params)
  assert state.v_row["w"].shape == (8, 1) and state.v_col["w"].shape == (1, 6)
  assert state.v["b"].shape == (6,) and state.v["w"].shape == (1, 1)
  rng = np.random.default_rng(0)
  grads = [{"w": rng.normal(size=(8, 6)), "b": rng.normal(size=6)} for _ in range(3)]
  for g in grads:
    update, state = tx.update(jax.tree.map(jnp.asarray, g), state)
  # Exact reference: bias-corrected EMA of squares; factored = outer(row, col) / mean(row).
  w = np.array([(1 - beta2) * beta2 ** (2 - i) for i in range(3)]) / (1 - beta2**3)
  v_b = sum(wi * g["b"] ** 2 for wi, g in zip(w, grads, strict=True))
  np.testing.assert_allclose(update["b"], grads[-1]["b"] / np.sqrt(v_b), rtol=1e-5)
  row = sum(wi * (g["w"] ** 2).mean(1, keepdims=True) for wi, g in zip(w, grads, strict=True))
  col = sum(wi * (g["w"] ** 2).mean(0, keepdims=True) for wi, g in zip(w, grads, strict=True))
  np.testing.assert_allclose(
    update["w"], grads[-1]["w"] / np.sqrt(row * col / row.mean()), rtol=1e-5
  )
  # A rank-1 second moment is recovered exactly by the factorisation.
  tx1 = optim.scale_by_factored_rms(0.0, eps=0.0, min_dim_size_to_factor=4)
  g = np.outer(np.arange(1.0, 9.0), np.arange(1.0, 7.0))
  u, _ = tx1.update({"w": jnp.asarray(g)}, tx1.init({"w": jnp.zeros((8, 6))}))
  np.testing.assert_allclose(u["w"], np.ones((8, 6)), rtol=1e-5)


@pytest.mark.parametrize("name", ["adafactor", "adamw", "muon"])
def test_optimizers_minimise_a_quadratic(name):
  config = _config(name=name, lr=0.1, warmup_steps=0, weight_decay=0.0)
  tx, _ = optim.make_optimizer(config, 200, logical_axes={"w": P("embed", "mlp")})
  target = jnp.linspace(-1.0, 1.0, 128 * 4).reshape(128, 4)
  params = {"w": jnp.zeros((128, 4))}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(200):
    params, state = step(params, state)
  assert float(jnp.abs(params["w"] - target).max()) < 0.05


def test_weight_decay_only_on_matrices():
  tx, _ = optim.make_optimizer(_config(lr=1.0, warmup_steps=0, b1=None, weight_decay=0.5), 10)
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5 * np.ones((4, 4)), rtol=1e-6)  # -lr * wd * w
  np.testing.assert_allclose(updates["b"], np.zeros(4))


@pytest.mark.parametrize(
  "axes, want",
  [
    (("embed", "heads", "head_dim"), Muon((0,), (1, 2))),  # q, k, v projections
    (("heads", "head_dim", "embed"), Muon((0, 1), (2,))),  # attention output
    (("embed", "mlp"), Muon((0,), (1,))),
    (("text_embed", "embed"), Muon((0,), (1,))),
    (("layers", "mlp", "embed"), Muon((1,), (2,))),  # nn.scan's stack: one matrix per layer
    ((None, None, "conv_in", "conv_out"), Muon((0, 1, 2), (3,))),  # HWIO
    ((None, None, "conv_in", None), Muon((0, 1, 2), (3,))),  # a narrow, unsharded conv
    (("vocab", "embed"), None),  # token embedding
    (("embed", "vocab"), None),  # output head
    (("length", "embed"), None),  # position table
    ((None, "heads"), None),  # relative position bias
    ((None, None, "mlp"), None),  # depthwise convolution
    (("embed",), None),
    ((), None),  # a parameter without axis names
  ],
)
def test_muon_dimensions_from_axis_names(axes, want):
  assert optim.muon_dimensions(axes) == want


def test_muon_needs_axis_names():
  with pytest.raises(ValueError, match="logical axis names"):
    optim.make_optimizer(_config(name="muon"), 10)


def test_muon_orthogonalises_matrices_and_leaves_tables_to_adamw():
  """One step from zero momentum: a Muon matrix moves by an orthogonalised gradient (its
  singular values near 1), at AdamW's update RMS (0.2 x lr); a table moves as AdamW moves it."""
  config = _config(name="muon", lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip_norm=None)
  axes = {"w": P("embed", "mlp"), "table": P("vocab", "embed")}
  tx, _ = optim.make_optimizer(config, 10, logical_axes=axes)
  rng = np.random.default_rng(0)
  grads = {
    k: jnp.asarray(rng.normal(size=(64, 32)) * [[1.0] * 16 + [9.0] * 16], jnp.float32) for k in axes
  }
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  spread = lambda m: (lambda sv: sv.max() / sv.min())(
    np.linalg.svd(np.asarray(m), compute_uv=False)
  )
  # Muon's quintic Newton-Schulz leaves singular values in ~[0.7, 1.2] by design.
  assert spread(grads["w"]) > 20 and spread(updates["w"]) < 2, (
    spread(grads["w"]),
    spread(updates["w"]),
  )
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(updates["w"]))), 0.2, rtol=0.2)
  # The AdamW part is Nesterov's (as optax.contrib.muon builds it): its first step is
  # -lr * (1 + b1 (1 - b1) / (1 - b1^2)) * sign(g), the bias corrections making m / sqrt(v) = g / |g|.
  b1 = config.b1
  first = 1 + b1 * (1 - b1) / (1 - b1**2)
  np.testing.assert_allclose(updates["table"], -first * np.sign(grads["table"]), rtol=1e-4)


def test_opt_state_shardings_follow_params():
  mesh = partitioning.make_mesh({"fsdp": 4, "tensor": 2})
  params = {
    "k": jax.ShapeDtypeStruct((256, 512), jnp.float32),
    "b": jax.ShapeDtypeStruct((512,), jnp.float32),
  }
  shardings = {
    "k": NamedSharding(mesh, P("fsdp", "tensor")),
    "b": NamedSharding(mesh, P("tensor")),
  }
  tx, _ = optim.make_optimizer(_config(), 100)
  abstract = jax.eval_shape(tx.init, params)
  out = optim.opt_state_shardings(abstract, shardings)
  flat = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(out)[0]}
  specs = set(flat.values())
  assert P("fsdp", None) in specs and P(None, "tensor") in specs  # factored row / column stats
  assert P("fsdp", "tensor") in specs  # momentum
  assert all(s == P() for k, s in flat.items() if "count" in k)
  # The state can actually be created with these shardings.
  state = jax.jit(tx.init, out_shardings=out)(jax.tree.map(lambda s: jnp.zeros(s.shape), params))
  assert jax.tree.structure(state) == jax.tree.structure(out)


def test_muon_state_shardings_follow_params():
  """Muon's momentum and the AdamW part's moments live where their parameters do; each
  part's placeholders for the other part's parameters (optax.MaskedNode) stay."""
  mesh = partitioning.make_mesh({"fsdp": 4, "tensor": 2})
  params = {
    "k": jax.ShapeDtypeStruct((256, 512), jnp.float32),
    "e": jax.ShapeDtypeStruct((512, 64), jnp.float32),
  }
  shardings = {"k": NamedSharding(mesh, P("fsdp", "tensor")), "e": NamedSharding(mesh, P("tensor"))}
  axes = {"k": P("embed", "mlp"), "e": P("vocab", "embed")}
  tx, _ = optim.make_optimizer(_config(name="muon"), 100, logical_axes=axes)
  abstract = jax.eval_shape(tx.init, params)
  out = optim.opt_state_shardings(abstract, shardings)
  flat = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(out)[0]}
  muon_k = [s for k, s in flat.items() if "'muon'" in k and "['k']" in k]
  adam_e = [s for k, s in flat.items() if "'adam'" in k and "['e']" in k]
  assert muon_k == [P("fsdp", "tensor")], flat  # its momentum
  assert adam_e == [P("tensor", None)] * 2, flat  # mu and nu
  state = jax.jit(tx.init, out_shardings=out)(jax.tree.map(lambda s: jnp.zeros(s.shape), params))
  assert jax.tree.structure(state) == jax.tree.structure(out) == jax.tree.structure(abstract)


def test_accumulated_gradients_equal_full_batch():
  def loss_fn(params, batch, rng):
    del rng
    pred = batch["x"] @ params["w"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  batch = {
    "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
    "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
  }
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  key = jax.random.key(0)
  full = optim.accumulate_gradients(grad_fn, params, batch, key, 1)
  acc = optim.accumulate_gradients(grad_fn, params, batch, key, 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full, acc)
  with pytest.raises(ValueError, match="not divisible"):
    optim.accumulate_gradients(grad_fn, params, batch, key, 3)
