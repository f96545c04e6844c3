"""Vector quantizer: nearest-code lookup, commitment loss, straight-through gradients.

VQ-VAE (van den Oord et al. 2017) as the Muse / MaskGIT tokenizers use it (Muse §2.2):
each latent vector ``z`` is replaced by its nearest codebook entry ``e_k``,

    k = argmin_j ||z - e_j||²,      z_q = z + stop_grad(e_k - z)   (straight-through),

and trained with ``||sg[z] - e_k||²`` (moves the codes) plus ``β ||z - sg[e_k]||²`` (the
commitment term, β = 0.25, keeps the encoder near its codes).

Dead codes (entries no encoder output is ever nearest to) are the known failure mode of
VQGANs. Two remedies are offered: l2-normalised codes (``l2_normalize=True``, ViT-VQGAN
§3.2: lookup by cosine similarity, best paired with a low-dimensional ``embed_dim``), and
``restart_dead_codes`` / ``kmeans_init``, pure functions the trainer applies to the codebook
between steps (Dhariwal et al. 2020, Jukebox §3: re-seed unused codes with encoder outputs).
Per-step usage counts are returned in the metrics for that purpose.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.partitioning import VOCAB

Array = jax.Array


def _l2n(x: Array, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def nearest_code(z: Array, codebook: Array) -> Array:
  """Ids of the nearest codebook entries (squared Euclidean distance).

  Args:
    z: float [N, D] latent vectors.
    codebook: float [K, D].

  Returns:
    int32 [N] ids.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  # ||z||² is constant per row and does not change the argmin.
  dots = jnp.einsum("ND,KD->NK", z, codebook, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(codebook * codebook, axis=-1)[None, :] - 2.0 * dots
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def code_stats(ids: Array, codebook_size: int) -> dict[str, Array]:
  """Usage counts, fraction of codes used and perplexity of a batch of ids."""
  counts = jnp.zeros((codebook_size,), jnp.float32).at[ids.reshape(-1)].add(1.0)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10))))
  usage = jnp.mean((counts > 0).astype(jnp.float32))
  return {"code_counts": counts, "codebook_usage": usage, "perplexity": perplexity}


class VectorQuantizer(nn.Module):
  """Codebook of ``codebook_size`` vectors of width ``embed_dim``.

  Parameter ``embedding``: float32 [K, D] (diffusers ``quantize.embedding.weight``).
  """

  codebook_size: int = 8192  # K
  embed_dim: int = 64  # D
  beta: float = 0.25  # commitment weight (Muse/MaskGIT: 0.25)
  l2_normalize: bool = False  # lookup by cosine similarity; codes and latents on the unit sphere
  init_scale: float = 1.0  # std of the initial codes (diffusers uses U(-1/K, 1/K): dead at start)

  def setup(self):
    init = nn.initializers.normal(self.init_scale)
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(init, (VOCAB, None)),
      (self.codebook_size, self.embed_dim),
    )

  def codebook(self) -> Array:
    cb = jnp.asarray(self.embedding, jnp.float32)
    return _l2n(cb) if self.l2_normalize else cb

  def __call__(self, z: Array) -> tuple[Array, Array, dict[str, Array]]:
    """Quantizes ``z`` [..., D].

    Returns:
      ``(z_q, ids, aux)``: ``z_q`` [..., D] with straight-through gradients (dtype of ``z``),
      ids int32 [...], and ``aux`` with ``codebook_loss``, ``commitment_loss``,
      ``quantizer_loss`` (= codebook + β·commitment), ``code_counts`` [K],
      ``codebook_usage`` and ``perplexity``.
    """
    if z.shape[-1] != self.embed_dim:
      raise ValueError(
        f"latents have {z.shape[-1]} channels; the codebook expects embed_dim={self.embed_dim}"
      )
    dtype = z.dtype
    zf = z.astype(jnp.float32)
    if self.l2_normalize:
      zf = _l2n(zf)
    cb = self.codebook()
    ids = nearest_code(zf.reshape(-1, self.embed_dim), cb).reshape(z.shape[:-1])
    e = jnp.take(cb, ids, axis=0)
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zf) - e))
    commitment_loss = jnp.mean(jnp.square(zf - jax.lax.stop_gradient(e)))
    z_q = zf + jax.lax.stop_gradient(e - zf)
    aux = {
      "codebook_loss": codebook_loss,
      "commitment_loss": commitment_loss,
      "quantizer_loss": codebook_loss + self.beta * commitment_loss,
      **code_stats(ids, self.codebook_size),
    }
    return z_q.astype(dtype), ids, aux

  def lookup(self, ids: Array) -> Array:
    """Codes for ids: int [...] -> float32 [..., D]."""
    return jnp.take(self.codebook(), ids, axis=0)


# ---------------------------------------------------------------------------
# Codebook maintenance: pure functions on the [K, D] codebook, applied by the trainer.


def kmeans_init(z: Array, codebook_size: int, rng: Array, iters: int = 10) -> Array:
  """A codebook from k-means on encoder outputs (data-dependent init).

  Args:
    z: float [N, D] encoder outputs (N >= 1; sampled with replacement when N < K).
    codebook_size: K.
    rng: PRNG key.
    iters: Lloyd iterations.

  Returns:
    float32 [K, D] centroids; empty clusters keep their previous centroid.
  """
  z = z.astype(jnp.float32)
  n = z.shape[0]
  idx = jax.random.choice(rng, n, (codebook_size,), replace=n < codebook_size)
  cents = z[idx]

  def step(c, _):
    ids = nearest_code(z, c)
    sums = jnp.zeros_like(c).at[ids].add(z)
    cnt = jnp.zeros((codebook_size,), jnp.float32).at[ids].add(1.0)
    return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], c), None

  cents, _ = jax.lax.scan(step, cents, None, length=iters)
  return cents


def restart_dead_codes(
  codebook: Array,
  usage_ema: Array,
  z: Array,
  rng: Array,
  threshold: float = 1e-3,
  noise: float = 0.0,
) -> tuple[Array, Array]:
  """Replaces codes whose usage EMA fell below ``threshold`` with random encoder outputs.

  Args:
    codebook: float [K, D].
    usage_ema: float [K], running mean of per-step code counts (see ``code_stats``).
    z: float [N, D] encoder outputs of the current batch (pre-quantization).
    rng: PRNG key.
    threshold: codes used less than this (in expected hits per step) are dead.
    noise: std of gaussian noise added to the re-seeded codes.

  Returns:
    ``(codebook, n_restarted)``; restarted codes also get their usage EMA reset by the caller.
  """
  k1, k2 = jax.random.split(rng)
  dead = usage_ema < threshold
  pick = jax.random.randint(k1, (codebook.shape[0],), 0, z.shape[0])
  fresh = z[pick].astype(codebook.dtype)
  if noise:
    fresh = fresh + noise * jax.random.normal(k2, fresh.shape, fresh.dtype)
  return jnp.where(dead[:, None], fresh, codebook), jnp.sum(dead)


# ---------------------------------------------------------------------------
# Code noise for decoder finetuning: the decoder learns to render the image a slightly
# wrong token grid was meant to be.


def nearest_codes(codebook: Array, k: int, chunk: int = 1024) -> Array:
  """Each code's ``k`` nearest other codes (squared Euclidean distance), nearest first.

  Computed once for a frozen codebook, ``chunk`` rows at a time, so that K = 8192 needs
  a [chunk, K] distance block rather than [K, K].

  Args:
    codebook: float [K, D].
    k: neighbours per code, 1 <= k < K.

  Returns:
    int32 [K, k]; a code is never its own neighbour (duplicates of it may be).
  """
  size = codebook.shape[0]
  if not 1 <= k < size:
    raise ValueError(f"nearest_codes: k={k} neighbours, expected 1 <= k < K={size}")
  cb = codebook.astype(jnp.float32)
  norms = jnp.sum(cb * cb, axis=-1)  # [K]
  chunk = min(chunk, size)

  @jax.jit
  def rows(start: Array) -> Array:  # [chunk] ids from `start` -> int32 [chunk, k]
    ids = jnp.minimum(start + jnp.arange(chunk), size - 1)
    dots = jnp.einsum("CD,KD->CK", cb[ids], cb, precision=jax.lax.Precision.HIGHEST)
    dist = norms[ids][:, None] - 2.0 * dots + norms[None, :]  # [chunk, K]
    dist = jnp.where(ids[:, None] == jnp.arange(size)[None, :], jnp.inf, dist)
    return jax.lax.top_k(-dist, k)[1].astype(jnp.int32)

  return jnp.concatenate([rows(jnp.int32(s)) for s in range(0, size, chunk)])[:size]


def perturb_ids(rng: Array, ids: Array, neighbours: Array, rate: float) -> Array:
  """Replaces each id, with probability ``rate``, by one of its neighbours at random.

  Args:
    rng: PRNG key.
    ids: int [...] token ids.
    neighbours: int32 [K, k] (``nearest_codes``).
    rate: probability that a token is replaced.

  Returns:
    int32 ids of the shape of ``ids``.
  """
  flip_key, pick_key = jax.random.split(rng)
  flip = jax.random.bernoulli(flip_key, rate, ids.shape)
  pick = jax.random.randint(pick_key, ids.shape, 0, neighbours.shape[1])
  return jnp.where(flip, neighbours[ids, pick], ids).astype(jnp.int32)
