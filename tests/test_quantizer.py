"""Vector quantizer: nearest code, straight-through gradients, losses, usage, maintenance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models.quantizer import (
  VectorQuantizer,
  code_stats,
  kmeans_init,
  nearest_code,
  nearest_codes,
  perturb_ids,
  restart_dead_codes,
)


def _vq(**kw):
  q = VectorQuantizer(**{"codebook_size": 16, "embed_dim": 4, **kw})
  z = jax.random.normal(jax.random.key(1), (2, 3, 5, 4))
  params = q.init(jax.random.key(0), z)["params"]
  params = jax.tree.map(
    lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
  )
  return q, {"params": params}, z


def test_nearest_code_matches_brute_force():
  rng = np.random.default_rng(0)
  z, cb = rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(20, 6)).astype(np.float32)
  want = np.argmin(((z[:, None] - cb[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(nearest_code(jnp.asarray(z), jnp.asarray(cb)), want)


def test_output_is_the_code_and_ids_have_latent_shape():
  q, v, z = _vq()
  z_q, ids, aux = q.apply(v, z)
  assert ids.shape == (2, 3, 5) and ids.dtype == jnp.int32
  cb = v["params"]["embedding"]
  np.testing.assert_allclose(z_q, np.asarray(cb)[np.asarray(ids)], atol=1e-6)
  np.testing.assert_allclose(q.apply(v, ids, method=q.lookup), z_q, atol=1e-6)
  assert aux["code_counts"].shape == (16,) and float(aux["code_counts"].sum()) == 30


def test_straight_through_and_loss_gradients():
  q, v, z = _vq(beta=0.25)
  w = jax.random.normal(jax.random.key(2), z.shape)
  # The reconstruction path: d(sum(z_q * w))/dz == w, and no gradient to the codebook.
  gz = jax.grad(lambda z: jnp.sum(q.apply(v, z)[0] * w))(z)
  np.testing.assert_allclose(gz, w, atol=1e-6)
  gp = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, z)[0] * w))(v["params"])
  assert float(jnp.abs(gp["embedding"]).max()) == 0.0
  # The commitment term moves z only; the codebook term moves the codes only.
  g_commit_p = jax.grad(lambda p: q.apply({"params": p}, z)[2]["commitment_loss"])(v["params"])
  g_code_z = jax.grad(lambda z: q.apply(v, z)[2]["codebook_loss"])(z)
  assert float(jnp.abs(g_commit_p["embedding"]).max()) == 0.0
  assert float(jnp.abs(g_code_z).max()) == 0.0
  _, _, aux = q.apply(v, z)
  np.testing.assert_allclose(
    aux["quantizer_loss"], aux["codebook_loss"] + 0.25 * aux["commitment_loss"], rtol=1e-6
  )
  np.testing.assert_allclose(aux["codebook_loss"], aux["commitment_loss"], rtol=1e-6)


def test_code_stats():
  s = code_stats(jnp.array([[0, 0, 1, 3]]), 4)
  np.testing.assert_array_equal(s["code_counts"], [2, 1, 0, 1])
  assert float(s["codebook_usage"]) == 0.75
  p = np.array([0.5, 0.25, 0.25])
  np.testing.assert_allclose(s["perplexity"], np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  uniform = code_stats(jnp.arange(8), 8)
  np.testing.assert_allclose(uniform["perplexity"], 8.0, rtol=1e-5)


def test_l2_normalized_codes_are_unit_vectors():
  q, v, z = _vq(l2_normalize=True)
  z_q, _, _ = q.apply(v, 10.0 * z)
  np.testing.assert_allclose(jnp.linalg.norm(z_q, axis=-1), 1.0, atol=1e-5)


def test_wrong_width_names_both():
  q, v, _ = _vq()
  with pytest.raises(ValueError, match=r"5 channels.*embed_dim=4"):
    q.apply(v, jnp.zeros((1, 2, 2, 5)))


def test_kmeans_init_beats_random_codes():
  rng = jax.random.key(3)
  centers = 5.0 * jax.random.normal(rng, (8, 3))
  z = centers[jax.random.randint(jax.random.key(4), (512,), 0, 8)] + 0.1 * jax.random.normal(
    rng, (512, 3)
  )
  cb = kmeans_init(z, 8, jax.random.key(5))
  err = lambda c: float(jnp.mean(jnp.sum((z - c[nearest_code(z, c)]) ** 2, -1)))
  assert err(cb) < err(jax.random.normal(rng, (8, 3))) / 10
  assert cb.shape == (8, 3)


def test_restart_dead_codes_replaces_only_dead_ones():
  cb = jnp.arange(12.0).reshape(4, 3)
  usage = jnp.array([1.0, 0.0, 2.0, 0.0])
  z = 100.0 + jnp.arange(15.0).reshape(5, 3)
  new, n = restart_dead_codes(cb, usage, z, jax.random.key(0), threshold=0.5)
  assert int(n) == 2
  np.testing.assert_array_equal(new[jnp.array([0, 2])], cb[jnp.array([0, 2])])
  assert bool(jnp.all(new[jnp.array([1, 3])] >= 100.0))


def test_nearest_codes_match_brute_force_across_chunks():
  cb = jax.random.normal(jax.random.key(3), (300, 5))
  c = np.asarray(cb)
  d = ((c[:, None] - c[None]) ** 2).sum(-1)
  np.fill_diagonal(d, np.inf)
  got = nearest_codes(cb, 4, chunk=128)  # 300 rows: the last chunk is partial
  np.testing.assert_array_equal(got, np.argsort(d, axis=1)[:, :4])
  with pytest.raises(ValueError, match="k=300 neighbours, expected 1 <= k < K=300"):
    nearest_codes(cb, 300)


def test_perturb_ids_swaps_at_the_rate_and_only_for_neighbours():
  neighbours = nearest_codes(jax.random.normal(jax.random.key(4), (64, 3)), 2)
  ids = jax.random.randint(jax.random.key(5), (32, 8, 8), 0, 64)
  out = np.asarray(perturb_ids(jax.random.key(6), ids, neighbours, 0.3))
  ids, nb = np.asarray(ids), np.asarray(neighbours)
  changed = out != ids
  assert out.shape == ids.shape and out.dtype == np.int32
  assert 0.27 < changed.mean() < 0.33  # 2048 tokens: a 4-sigma band
  assert all(o in nb[i] for i, o in zip(ids[changed], out[changed], strict=True))
  np.testing.assert_array_equal(perturb_ids(jax.random.key(6), ids, neighbours, 0.0), ids)
