"""Tests for muse_jax.editing: token masks and outpainting canvases."""

import numpy as np
import pytest

from muse_jax import editing


def test_token_mask_marks_every_token_a_masked_pixel_touches():
  pixel = np.zeros((16, 16), bool)
  pixel[3, 9] = True  # one pixel in token (0, 2) at f=4
  pixel[12:16, 0:5] = True  # tokens (3, 0) and (3, 1)
  tokens = editing.token_mask(pixel, 4)
  assert tokens.shape == (4, 4)
  assert set(zip(*np.nonzero(tokens))) == {(0, 2), (3, 0), (3, 1)}
  with pytest.raises(ValueError, match="not a multiple of the token size 3"):
    editing.token_mask(pixel, 3)


def test_upsample_token_mask_covers_the_same_area():
  low = np.array([[True, False], [False, True]])
  high = editing.upsample_token_mask(low, (4, 4))
  np.testing.assert_array_equal(high, np.kron(low, np.ones((2, 2), bool)))
  with pytest.raises(ValueError, match="not a multiple"):
    editing.upsample_token_mask(low, (3, 4))


@pytest.mark.parametrize(
  "directions", ["right", "left", "up", "down", ("right", "down"), ("left", "up")]
)
def test_outpaint_canvas_shifts_the_image_and_masks_exactly_the_new_border(directions):
  s, size = 16, 5
  image = np.arange(s * s * 3, dtype=np.uint8).reshape(s, s, 3)
  canvas, mask = editing.outpaint_canvas(image, directions, size, multiple=4)
  border = 8  # 5 rounded up to whole 4-pixel tokens
  dirs = {directions} if isinstance(directions, str) else set(directions)
  dy = border * (("down" in dirs) - ("up" in dirs))
  dx = border * (("right" in dirs) - ("left" in dirs))
  for y in range(s):
    for x in range(s):
      sy, sx = y + dy, x + dx
      inside = 0 <= sy < s and 0 <= sx < s
      assert mask[y, x] == (not inside)
      if inside:
        np.testing.assert_array_equal(canvas[y, x], image[sy, sx])


@pytest.mark.parametrize(
  "directions, size, message",
  [
    ("sideways", 4, "must be some of"),
    (("left", "right"), 4, "pull opposite ways"),
    ("left", 16, "size must be in \\(0, 16\\)"),
    ("up", -3, "got -3$"),
  ],
)
def test_outpaint_canvas_rejects_bad_requests(directions, size, message):
  with pytest.raises(ValueError, match=message):
    editing.outpaint_canvas(np.zeros((16, 16, 3), np.uint8), directions, size)


def test_outpaint_size_error_names_the_size_given_and_its_rounding():
  with pytest.raises(ValueError, match="got 13 \\(16 when rounded up to a multiple of 4\\)"):
    editing.outpaint_canvas(np.zeros((16, 16, 3), np.uint8), "left", 13, multiple=4)


def test_check_mask_accepts_bool_binary_and_255_masks():
  m = np.zeros((4, 4), np.uint8)
  m[1, 2] = 255
  assert editing.check_mask(m, 4).sum() == 1
  assert editing.check_mask(m // 255, 4).sum() == 1
  assert editing.check_mask(m.astype(bool)[..., None].repeat(3, -1), 4).sum() == 1
