"""Tests for muse_jax.masking: the arccos training draw and the decoding schedules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import masking


@pytest.mark.parametrize("name", sorted(masking.SCHEDULES))
def test_schedules_go_from_one_to_zero_monotonically(name):
  p = jnp.linspace(0.0, 1.0, 101)
  r = np.asarray(masking.mask_ratio(name, p))
  assert r[0] == pytest.approx(1.0, abs=1e-6)
  assert r[-1] == pytest.approx(0.0, abs=1e-6)
  assert np.all(np.diff(r) <= 1e-7), f"{name} is not non-increasing"


def test_cosine_schedule_is_the_papers():
  p = np.linspace(0, 1, 7)
  np.testing.assert_allclose(masking.mask_ratio("cosine", p), np.cos(np.pi / 2 * p), atol=1e-6)


def test_unknown_schedule_names_the_known_ones():
  with pytest.raises(ValueError, match="unknown mask schedule 'cosin'.*cosine"):
    masking.mask_ratio("cosin", 0.5)


def test_arccos_rates_follow_the_arccos_distribution():
  r = np.asarray(masking.arccos_rate(jax.random.key(0), 20000))
  # CDF of p(r) = 2/π (1 − r²)^(−1/2) on [0, 1] is 1 − (2/π) arccos(r).
  for x in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
    expected = 1 - 2 / np.pi * np.arccos(x)
    assert np.mean(r <= x) == pytest.approx(expected, abs=0.015), x


def test_mask_counts_are_ceil_of_rate_times_length_and_at_least_one():
  rng = jax.random.key(3)
  batch, length = 512, 37
  mask = np.asarray(masking.arccos_mask(rng, batch, length))
  assert mask.shape == (batch, length) and mask.dtype == bool
  # Recompute the rates from the same key split that arccos_mask uses.
  k_rate = jax.random.split(rng, 4)[0]
  rates = np.asarray(masking.arccos_rate(k_rate, batch))
  expected = np.clip(np.ceil(rates * length), 1, length)
  np.testing.assert_array_equal(mask.sum(-1), expected)
  # Positions are spread over the whole sequence, not biased to one end.
  assert mask[:, : length // 2].mean() == pytest.approx(mask[:, length // 2 :].mean(), abs=0.05)


def test_min_rate_clips_the_draw():
  mask = np.asarray(masking.arccos_mask(jax.random.key(1), 2000, 100, min_rate=0.5))
  assert mask.sum(-1).min() >= 50


def test_rectangle_masks_are_one_contiguous_rectangle_of_about_the_rate():
  h, w = 8, 12
  rates = jnp.linspace(0.05, 1.0, 64)
  mask = np.asarray(masking.rectangle_mask(jax.random.key(2), rates, (h, w))).reshape(-1, h, w)
  for m, r in zip(mask, np.asarray(rates)):
    rows, cols = np.nonzero(m)
    assert rows.size >= 1
    box = m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.all(), "masked region is not a filled rectangle"
    assert box.size == m.sum(), "masked cells outside the rectangle"
    # Rounding to whole rows/columns and clipping to the grid keep the area near r·h·w.
    assert abs(m.sum() - max(r * h * w, 1)) <= max(h, w) + 0.5 * r * h * w


def test_rect_prob_mixes_rectangles_and_random_positions():
  h, w = 6, 6
  mask = np.asarray(masking.arccos_mask(jax.random.key(5), 400, h * w, rect_prob=0.5, grid=(h, w)))

  def is_rectangle(m):
    rows, cols = np.nonzero(m.reshape(h, w))
    return m.reshape(h, w)[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()

  frac = np.mean([is_rectangle(m) for m in mask])
  # Random-position masks are occasionally rectangles too (e.g. one token).
  assert 0.45 < frac < 0.8


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rect_prob=0.5), "needs grid"),
    (dict(rect_prob=0.5, grid=(3, 3)), "h \\* w == length"),
    (dict(min_rate=1.5), "min_rate must be in"),
    (dict(rect_prob=-0.1), "rect_prob must be in"),
  ],
)
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    masking.arccos_mask(jax.random.key(0), 2, 16, **kwargs)


def test_rank_breaks_ties_by_index():
  x = jnp.array([[3.0, 1.0, 1.0, math.inf, 0.0]])
  np.testing.assert_array_equal(masking.rank(x), [[3, 1, 2, 4, 0]])


@pytest.mark.parametrize("name", sorted(masking.SCHEDULES))
def test_host_table_matches_the_device_schedule(name):
  table = masking.ratio_table(name, 12)
  assert table.dtype == np.float32 and table.shape == (13,)
  np.testing.assert_allclose(table, masking.mask_ratio(name, np.arange(13) / 12), atol=1e-6)
