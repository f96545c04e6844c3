"""Masking-rate schedules: the training draw and the decoding schedules.

Training (Muse §2.4, MaskGIT §3.2): each example gets a masking rate r drawn from the
truncated arccos distribution, density p(r) = 2/π · (1 − r²)^(−1/2) on [0, 1], which is
what r = cos(π/2 · u) with u ~ U(0, 1) gives. It favours high masking rates, the regime
the first decoding steps live in. ⌈r·L⌉ tokens (at least one) are then masked at random
positions; optionally, with some probability, a contiguous rectangle of about that area
is masked instead, which teaches the model the inpainting / outpainting case (§3.3).

Decoding (§2.8): after step i of N, the fraction of the initially unknown tokens that
stays masked is γ((i + 1)/N) for a schedule γ: [0, 1] → [0, 1], decreasing from
γ(0) = 1 to γ(1) = 0. The cosine schedule is the paper's default.

All functions have fixed output shapes (no data-dependent shapes), so they trace once.
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Sharpness of the "exp" schedule: γ(p) = (1 − e^(−α(1−p))) / (1 − e^(−α)).
_EXP_ALPHA = 5.0

# γ(p, xp) for an array module xp (jax.numpy in traced code, numpy for step tables).
Schedule = Callable[[Any, Any], Any]

SCHEDULES: dict[str, Schedule] = {
  # p · π / 2 in this order, as open-muse / diffusers compute it in float32.
  "cosine": lambda p, xp: xp.cos(p * xp.pi / 2),
  "linear": lambda p, xp: 1.0 - p,
  "square": lambda p, xp: 1.0 - p**2,
  "cubic": lambda p, xp: 1.0 - p**3,
  "sqrt": lambda p, xp: 1.0 - xp.sqrt(p),
  # Reveals few tokens early and most of them in the last steps.
  "exp": lambda p, xp: (1.0 - xp.exp(-_EXP_ALPHA * (1.0 - p))) / (1.0 - math.exp(-_EXP_ALPHA)),
}


def get_schedule(name: str) -> Schedule:
  """Returns the schedule γ called ``name``; raises naming the known ones."""
  try:
    return SCHEDULES[name]
  except KeyError:
    raise ValueError(
      f"unknown mask schedule {name!r}; expected one of {sorted(SCHEDULES)}"
    ) from None


def mask_ratio(name: str, progress: jax.Array | float) -> jax.Array:
  """Fraction of tokens still masked at ``progress`` in [0, 1] under schedule ``name``."""
  p = jnp.clip(jnp.asarray(progress, jnp.float32), 0.0, 1.0)
  return jnp.clip(get_schedule(name)(p, jnp), 0.0, 1.0)


def ratio_table(name: str, num_steps: int) -> np.ndarray:
  """γ(i / N) for i = 0..N as float32 numpy, computed on the host.

  Decoding loops index this table instead of evaluating γ on device, so the count of
  tokens kept masked at each step is one reproducible number: XLA may rewrite x / N as
  x · (1/N) and land one ulp off, which flips ⌊n·γ⌋ at exact integers (e.g. γ = 1/2).
  """
  p = np.arange(num_steps + 1, dtype=np.float32) / np.float32(num_steps)
  return np.clip(get_schedule(name)(p, np), 0.0, 1.0).astype(np.float32)


def arccos_rate(rng: jax.Array, batch: int, *, min_rate: float = 0.0) -> jax.Array:
  """Draws masking rates r = cos(π/2 · u), u ~ U(0, 1); float32 [B], clipped below."""
  u = jax.random.uniform(rng, (batch,))
  return jnp.maximum(jnp.cos(0.5 * jnp.pi * u), min_rate)


def rank(x: jax.Array) -> jax.Array:
  """Rank of each entry along the last axis (0 = smallest); ties broken by index."""
  return jnp.argsort(jnp.argsort(x, axis=-1), axis=-1)


def random_mask(rng: jax.Array, num_masked: jax.Array, length: int) -> jax.Array:
  """Masks exactly ``num_masked[b]`` uniformly random positions of each row.

  Args:
    rng: PRNG key.
    num_masked: int [B], how many positions to mask per row (0..L).
    length: L.

  Returns:
    bool [B, L], True where masked.
  """
  noise = jax.random.uniform(rng, (num_masked.shape[0], length))
  return rank(noise) < num_masked[:, None]


def rectangle_mask(rng: jax.Array, rates: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Masks one axis-aligned rectangle per row, of area ≈ rate · h · w.

  The aspect ratio is drawn log-uniformly in [1/2, 2]; the position uniformly among
  those that keep the rectangle inside the grid. At least one token is masked.

  Args:
    rng: PRNG key.
    rates: float [B] masking rates in [0, 1].
    grid: (h, w) of the token grid; L = h · w.

  Returns:
    bool [B, L], True where masked (row-major over the grid).
  """
  h, w = grid
  b = rates.shape[0]
  k_aspect, k_top, k_left = jax.random.split(rng, 3)
  aspect = jnp.exp(jax.random.uniform(k_aspect, (b,), minval=-math.log(2), maxval=math.log(2)))
  area = jnp.maximum(rates * h * w, 1.0)
  rect_h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
  rect_w = jnp.clip(jnp.ceil(area / rect_h), 1, w).astype(jnp.int32)
  top = jnp.floor(jax.random.uniform(k_top, (b,)) * (h - rect_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b,)) * (w - rect_w + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]  # [1, h, 1]
  cols = jnp.arange(w)[None, None, :]  # [1, 1, w]
  inside = (
    (rows >= top[:, None, None])
    & (rows < (top + rect_h)[:, None, None])
    & (cols >= left[:, None, None])
    & (cols < (left + rect_w)[:, None, None])
  )  # [B, h, w]
  return inside.reshape(b, h * w)


def arccos_mask(
  rng: jax.Array,
  batch: int,
  length: int,
  *,
  min_rate: float = 0.0,
  rect_prob: float = 0.0,
  grid: tuple[int, int] | None = None,
) -> jax.Array:
  """The training mask: arccos-distributed rate, then random positions or a rectangle.

  Args:
    rng: PRNG key.
    batch: B.
    length: L, the number of image tokens.
    min_rate: lower clip of the drawn rate (open-muse's ``min_masking_rate``).
    rect_prob: probability that a row masks one contiguous rectangle instead of random
      positions; needs ``grid``.
    grid: (h, w) with h · w = L, for rectangle masks.

  Returns:
    bool [B, L], True where the token is replaced by the mask token. Random-position
    rows mask exactly max(1, ⌈r·L⌉) tokens.
  """
  if not 0.0 <= min_rate <= 1.0:
    raise ValueError(f"min_rate must be in [0, 1]; got {min_rate}")
  if not 0.0 <= rect_prob <= 1.0:
    raise ValueError(f"rect_prob must be in [0, 1]; got {rect_prob}")
  if rect_prob > 0 and (grid is None or grid[0] * grid[1] != length):
    raise ValueError(
      f"rect_prob > 0 needs grid=(h, w) with h * w == length={length}; got grid={grid}"
    )
  k_rate, k_pos, k_rect, k_choose = jax.random.split(rng, 4)
  rates = arccos_rate(k_rate, batch, min_rate=min_rate)
  num = jnp.clip(jnp.ceil(rates * length), 1, length).astype(jnp.int32)
  mask = random_mask(k_pos, num, length)
  if rect_prob > 0:
    use_rect = jax.random.uniform(k_choose, (batch,)) < rect_prob
    mask = jnp.where(use_rect[:, None], rectangle_mask(k_rect, rates, grid), mask)
  return mask
