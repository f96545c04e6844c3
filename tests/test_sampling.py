"""Tests for muse_jax.sampling: the masked decoding loop and mask-free editing.

The model is a toy with context (each token's logits depend on its own embedding, its
position, the mean of its row and a per-row conditioning vector), so the loop's
choices depend on what it has revealed so far, as with a real transformer.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from muse_jax import masking, partitioning, sampling

K, D, L, MASK = 16, 8, 24, 16


def toy_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "embed": jax.random.normal(k[0], (K + 1, D)),
    "out": jax.random.normal(k[1], (D, K)),
    "pos": jax.random.normal(k[2], (L, K)),
  }


def toy_logits(params, cond, ids):
  """ids [B, L], cond [B, D] -> logits [B, L, K]."""
  emb = params["embed"][ids]  # [B, L, D]
  ctx = emb.mean(axis=1, keepdims=True) + cond[:, None, :]  # [B, 1, D]
  return jnp.einsum("BLD,DK->BLK", emb + ctx, params["out"]) + params["pos"][None]


def make_logits_fn(params, cond, uncond=None):
  """The closure contract: B rows -> conditional; 2B rows -> [conditional; unconditional]."""

  def fn(ids):
    c = cond if uncond is None or ids.shape[0] == cond.shape[0] else jnp.concatenate([cond, uncond])
    return toy_logits(params, c, ids)

  return fn


@pytest.fixture(scope="module")
def params():
  return toy_params()


def conds(batch, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (batch, D)), jax.random.normal(k2, (batch, D))


def partly_known(batch, seed=2, frac=0.5):
  """Rows where about ``frac`` of the tokens are known (editing), row 0 all masked."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  known = jax.random.uniform(k1, (batch, L)) < frac
  known = known.at[0].set(False)
  return jnp.where(known, jax.random.randint(k2, (batch, L), 0, K), MASK)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exp"])
def test_each_masked_position_is_filled_once_and_counts_follow_the_schedule(params, schedule):
  num_steps = 6
  cond, uncond = conds(3)
  init = partly_known(3)
  out = sampling.decode(
    init,
    make_logits_fn(params, cond, uncond),
    jax.random.key(0),
    mask_id=MASK,
    num_steps=num_steps,
    schedule=schedule,
    guidance_scale=1.0,
    return_history=True,
  )
  hist = np.asarray(out.history)  # [N, B, L]
  init = np.asarray(init)
  assert hist.shape == (num_steps, *init.shape)
  np.testing.assert_array_equal(hist[-1], np.asarray(out.ids))
  assert not (hist[-1] == MASK).any()
  assert ((hist[-1] >= 0) & (hist[-1] < K)).all()

  # Once a position is revealed it keeps its token to the end: filled exactly once.
  seq = np.concatenate([init[None], hist])  # [N+1, B, L]
  revealed = seq != MASK
  assert (revealed[1:] >= revealed[:-1]).all(), "a revealed token was masked again"
  first = np.argmax(revealed, axis=0)  # step index at which each position is filled
  final = seq[-1]
  for s in range(num_steps + 1):
    later = s >= first
    np.testing.assert_array_equal(seq[s][later], final[later])

  # Masked counts: floor(n0 · γ((i+1)/N)), clipped to [1, n-1] while steps remain.
  n0 = (init == MASK).sum(-1)
  prev = n0.copy()
  gammas = masking.ratio_table(schedule, num_steps)
  for i in range(num_steps):
    gamma = gammas[i + 1]
    if i == num_steps - 1:
      expected = np.zeros_like(n0)
    else:
      expected = np.maximum(
        1, np.minimum(prev - 1, np.floor(n0.astype(np.float32) * gamma).astype(int))
      )
    np.testing.assert_array_equal((hist[i] == MASK).sum(-1), expected, err_msg=f"step {i}")
    prev = expected


def test_known_tokens_never_change(params):
  cond, _ = conds(4)
  init = partly_known(4, frac=0.6)
  out = sampling.decode(
    init,
    make_logits_fn(params, cond),
    jax.random.key(3),
    mask_id=MASK,
    num_steps=5,
    return_history=True,
  )
  known = np.asarray(init) != MASK
  for step_ids in np.asarray(out.history):
    np.testing.assert_array_equal(step_ids[known], np.asarray(init)[known])


def test_same_key_same_result_jitted_or_not(params):
  cond, uncond = conds(2)
  fn = make_logits_fn(params, cond, uncond)
  init = jnp.full((2, L), MASK)
  run = functools.partial(sampling.decode, mask_id=MASK, num_steps=4, guidance_scale=2.0, top_k=5)
  eager = run(init, fn, jax.random.key(7)).ids
  jitted = jax.jit(lambda i, k: run(i, fn, k).ids)
  np.testing.assert_array_equal(eager, jitted(init, jax.random.key(7)))
  np.testing.assert_array_equal(jitted(init, jax.random.key(7)), jitted(init, jax.random.key(7)))
  assert (jitted(init, jax.random.key(8)) != eager).any(), "another key should give other tokens"


def test_decode_is_one_compiled_loop(params):
  cond, uncond = conds(2)
  fn = make_logits_fn(params, cond, uncond)
  init = jnp.full((2, L), MASK)
  run = jax.jit(
    lambda k: sampling.decode(init, fn, k, mask_id=MASK, num_steps=12, guidance_scale=1.0).ids
  )
  # The steps are one loop over a fixed-shape state, not unrolled: the top level holds a
  # single while, and the model (its einsum) is traced once, inside that loop.
  top_level = [e.primitive.name for e in jax.make_jaxpr(run)(jax.random.key(0)).jaxpr.eqns]
  inner = jax.make_jaxpr(run)(jax.random.key(0)).jaxpr.eqns[0].params["jaxpr"].jaxpr
  loops = [e for e in inner.eqns if e.primitive.name in ("while", "scan")]
  assert top_level == ["jit"] and len(loops) == 1
  assert run.lower(jax.random.key(0)).as_text().count("stablehlo.dot_general") == 1


def test_top1_and_zero_temperature_give_argmax_of_the_current_logits(params):
  cond, _ = conds(2)
  fn = make_logits_fn(params, cond)
  init = partly_known(2, frac=0.3)
  for kwargs in (dict(top_k=1), dict(temperature=0.0)):
    out = sampling.decode(
      init, fn, jax.random.key(1), mask_id=MASK, num_steps=4, return_history=True, **kwargs
    )
    seq = np.concatenate([np.asarray(init)[None], np.asarray(out.history)])
    for i in range(1, len(seq)):
      newly = (seq[i - 1] == MASK) & (seq[i] != MASK)
      argmax = np.asarray(jnp.argmax(fn(jnp.asarray(seq[i - 1])), -1))
      np.testing.assert_array_equal(seq[i][newly], argmax[newly], err_msg=f"{kwargs} step {i}")


def test_guidance_schedule_values():
  t = [float(sampling.guidance_at(jnp.int32(i), 5, 3.0, "linear")) for i in range(5)]
  np.testing.assert_allclose(t, [0.0, 0.75, 1.5, 2.25, 3.0], rtol=1e-6)
  t = [float(sampling.guidance_at(jnp.int32(i), 5, 3.0, "constant")) for i in range(5)]
  np.testing.assert_allclose(t, [3.0] * 5)
  assert float(sampling.guidance_at(jnp.int32(0), 1, 3.0, "linear")) == 3.0


def test_guided_logits_at_each_step_of_the_ramp(params):
  """Each revealed token is the argmax of (1+t_i)·ℓc − t_i·ℓu with t_i on the ramp, and
  the kept tokens are the most confident under those guided logits."""
  batch, num_steps, scale = 3, 5, 2.5
  cond, uncond = conds(batch)
  out = sampling.decode(
    jnp.full((batch, L), MASK),
    make_logits_fn(params, cond, uncond),
    jax.random.key(4),
    mask_id=MASK,
    num_steps=num_steps,
    temperature=0.0,
    choice_temperature=0.0,
    guidance_scale=scale,
    guidance_schedule="linear",
    return_history=True,
  )
  seq = np.concatenate([np.full((1, batch, L), MASK), np.asarray(out.history)])
  for i in range(num_steps):
    prev = jnp.asarray(seq[i])
    t = scale * i / (num_steps - 1)
    lc = np.asarray(toy_logits(params, cond, prev))
    lu = np.asarray(toy_logits(params, uncond, prev))
    guided = (1 + t) * lc - t * lu
    np.testing.assert_allclose(
      sampling.guided_logits(make_logits_fn(params, cond, uncond), prev, jnp.float32(t)),
      guided,
      rtol=1e-5,
      atol=1e-4,
    )
    newly = (seq[i] == MASK) & (seq[i + 1] != MASK)
    still = seq[i + 1] == MASK
    np.testing.assert_array_equal(seq[i + 1][newly], guided.argmax(-1)[newly], err_msg=f"step {i}")
    conf = jax.nn.log_softmax(guided, -1).max(-1)
    for b in range(batch):
      if still[b].any():
        assert conf[b][newly[b]].min() >= conf[b][still[b]].max() - 1e-5


def test_guidance_equals_decoding_the_combined_logits(params):
  cond, uncond = conds(2)
  t = 3.0
  kw = dict(mask_id=MASK, num_steps=4, guidance_schedule="constant")
  init = jnp.full((2, L), MASK)
  guided = sampling.decode(
    init, make_logits_fn(params, cond, uncond), jax.random.key(9), guidance_scale=t, **kw
  )

  def combined(ids):
    return (1 + t) * toy_logits(params, cond, ids) - t * toy_logits(params, uncond, ids)

  plain = sampling.decode(init, combined, jax.random.key(9), **kw)
  np.testing.assert_array_equal(guided.ids, plain.ids)


def test_batch_rows_are_independent(params):
  cond, uncond = conds(3)
  init = jnp.full((3, L), MASK)
  run = jax.jit(
    lambda i, c, u: (
      sampling.decode(
        i,
        make_logits_fn(params, c, u),
        jax.random.key(5),
        mask_id=MASK,
        num_steps=4,
        guidance_scale=1.0,
      ).ids
    )
  )
  base = run(init, cond, uncond)
  # Change everything about rows 1 and 2: their known tokens and their conditioning.
  other_init = partly_known(3, seed=11)
  other_cond = cond.at[1:].set(-cond[1:])
  changed = run(other_init, other_cond, uncond.at[1:].set(0.0))
  np.testing.assert_array_equal(base[0], changed[0])
  assert (base[1:] != changed[1:]).any()


def test_sharded_batch_gives_the_unsharded_result(params):
  mesh = partitioning.make_mesh({"data": 8})
  batch = 8
  cond, uncond = conds(batch)
  init = partly_known(batch, frac=0.25)

  def run(i, c, u, k):
    return sampling.decode(
      i, make_logits_fn(params, c, u), k, mask_id=MASK, num_steps=4, guidance_scale=2.0, top_k=4
    ).ids

  single = jax.jit(run)(init, cond, uncond, jax.random.key(6))
  rows = NamedSharding(mesh, P("data"))
  sharded_fn = jax.jit(run, in_shardings=(rows, rows, rows, None), out_shardings=rows)
  with jax.set_mesh(mesh):
    sharded = sharded_fn(init, cond, uncond, jax.random.key(6))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


@pytest.mark.parametrize("k", [7, 128, 1000, 8192])
def test_inverse_cdf_picks_the_index_of_a_full_cumulative_sum(k):
  rng = np.random.default_rng(k)
  probs = rng.dirichlet(np.full(k, 0.3), size=(3, 50)).astype(np.float32)  # [3, 50, K]
  probs[0, :, k // 2 :] = 0.0  # a zero tail is never drawn
  uniform = rng.uniform(size=(3, 50)).astype(np.float32)
  uniform[1] = 1.0  # the top of the range
  uniform[2, :5] = np.float32(1e-7)  # the bottom: the first index
  got = np.asarray(sampling.inverse_cdf(jnp.asarray(probs), jnp.asarray(uniform), block=128))
  cdf = np.cumsum(probs.astype(np.float64), axis=-1)
  want = np.sum(cdf < (uniform * cdf[..., -1])[..., None], axis=-1)
  np.testing.assert_array_equal(got[[0, 2]], want[[0, 2]])
  assert (got[0] < k // 2).all()
  # u = 1 draws the last index whose mass a float32 sum still registers.
  tail = np.array([probs[1, i, j + 1 :].sum() / cdf[1, i, -1] for i, j in enumerate(got[1])])
  assert (got[1] < k).all() and (tail < 1e-6).all(), (got[1], tail.max())


def test_sample_tokens_matches_the_softmax_distribution():
  logits = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4]))
  n = 40000
  u = 1.0 - jax.random.uniform(jax.random.key(0), (1, n))
  tokens, log_prob = sampling.sample_tokens(jnp.broadcast_to(logits, (1, n, 4)), u)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=4) / n
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)
  np.testing.assert_allclose(log_prob, np.asarray(logits)[np.asarray(tokens)], rtol=1e-5)
  # Top-2 sampling only returns the two likeliest tokens, renormalised.
  tokens, log_prob = sampling.sample_tokens(jnp.broadcast_to(logits, (1, n, 4)), u, top_k=2)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=4) / n
  np.testing.assert_allclose(freq, [0, 0, 3 / 7, 4 / 7], atol=0.01)
  np.testing.assert_allclose(
    np.exp(log_prob[0, :2]), [[3 / 7, 4 / 7][t - 2] for t in tokens[0, :2]], rtol=1e-5
  )


def test_mask_free_editing_changes_only_editable_tokens_and_follows_the_prompt(params):
  batch, iters = 2, 60
  start = jax.random.randint(jax.random.key(1), (batch, L), 0, K)
  editable = jnp.arange(L)[None, :] < jnp.array([[L // 2], [L]])  # row 0: first half only
  target = 7

  def prompt_logits(
    ids,
  ):  # conditional rows want token 7 everywhere; unconditional rows don't care.
    base = toy_logits(params, jnp.zeros((ids.shape[0], D)), ids) * 0.1
    want = jnp.zeros((ids.shape[0], 1, K)).at[:batch, :, target].set(5.0)
    return base + want

  out = sampling.resample_edit(
    start,
    prompt_logits,
    jax.random.key(2),
    mask_id=MASK,
    num_iterations=iters,
    editable=editable,
    return_history=True,
  )
  ids, hist = np.asarray(out.ids), np.asarray(out.history)
  frozen = ~np.asarray(editable)
  np.testing.assert_array_equal(ids[frozen], np.asarray(start)[frozen])
  # At most ceil(8% of the editable count) tokens change per iteration.
  per_iter = np.ceil(0.08 * np.asarray(editable).sum(-1))
  seq = np.concatenate([np.asarray(start)[None], hist])
  assert ((seq[1:] != seq[:-1]).sum(-1) <= per_iter).all()
  # With guidance toward token 7, the editable tokens have (nearly) all become 7.
  assert (ids[np.asarray(editable)] == target).mean() > 0.9


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (
      dict(init_ids=jnp.full((L,), MASK)),
      "init_ids must be \\[batch, length\\]; got shape \\(24,\\)",
    ),
    (dict(init_ids=jnp.full((1, L), 16.0)), "integer token ids; got dtype float32"),
    (dict(num_steps=0), "num_steps must be an int >= 1; got 0"),
    (dict(mask_id=3), "mask_id=3 is inside the codebook range \\[0, 16\\)"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0; got -1.0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be in \\[1, 16\\]"),
    (dict(schedule="cos"), "unknown mask schedule 'cos'"),
    (dict(guidance_schedule="ramp"), "guidance_schedule must be one of"),
    (dict(choice_temperature=(1.0, 2.0, 3.0)), "choice_temperature must be a number or"),
    (dict(start_step=5, num_steps=5), "start_step must be an int in \\[0, num_steps=5\\)"),
  ],
)
def test_bad_input_names_the_argument(params, kwargs, message):
  args = dict(init_ids=jnp.full((1, L), MASK), mask_id=MASK, num_steps=2)
  args.update(kwargs)
  init = args.pop("init_ids")
  with pytest.raises(ValueError, match=message):
    sampling.decode(init, make_logits_fn(params, conds(1)[0]), jax.random.key(0), **args)


def test_bad_editing_input(params):
  fn = make_logits_fn(params, conds(1)[0])
  ids = jnp.zeros((1, L), jnp.int32)
  with pytest.raises(ValueError, match="resample_fraction must be in \\(0, 1\\]; got 0.0"):
    sampling.resample_edit(ids, fn, jax.random.key(0), mask_id=MASK, resample_fraction=0.0)
  with pytest.raises(ValueError, match="editable must have the shape"):
    sampling.resample_edit(
      ids, fn, jax.random.key(0), mask_id=MASK, editable=jnp.ones((1, 3), bool)
    )
