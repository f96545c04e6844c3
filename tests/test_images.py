"""Tests for muse_jax.images: ranges, loading user images, captioned grids."""

import numpy as np
from PIL import Image
import pytest

from muse_jax import images


def test_uint8_round_trip_and_clipping():
  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  np.testing.assert_array_equal(images.to_uint8(images.to_model_range(x)), x)
  np.testing.assert_array_equal(images.to_uint8(np.array([-3.0, 0.0, 3.0])), [0, 128, 255])
  with pytest.raises(ValueError, match="expected uint8 images; got dtype float32"):
    images.to_model_range(x.astype(np.float32))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_load_rgb_converts_any_mode_and_center_crops(tmp_path, mode):
  rgb = np.zeros((40, 60, 3), np.uint8)
  rgb[:, 20:40] = 255  # a white band in the middle third
  im = Image.fromarray(rgb)
  im = im.convert(mode) if mode != "I;16" else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
  path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
  im.save(path)
  out = images.load_rgb(path, size=20)
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  # The center crop keeps the white band in the middle and drops the dark sides.
  assert out[:, 8:12].mean() > 200 and out[:, :2].mean() < 60


def test_load_rgb_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="no image at"):
    images.load_rgb(tmp_path / "missing.png")
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(ValueError, match="bad.png: not a readable image"):
    images.load_rgb(bad)


def test_grid_places_every_image_and_writes_captions():
  tiles = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(5)]
  grid = images.make_grid(tiles, [f"prompt {i}" for i in range(5)], columns=3, pad=4)
  text_h = (grid.shape[0] - 4) // 2 - 32 - 4
  assert grid.shape[1] == 3 * (32 + 4) + 4
  for i, tile in enumerate(tiles):
    y = 4 + (i // 3) * (32 + text_h + 4)
    x = 4 + (i % 3) * (32 + 4)
    np.testing.assert_array_equal(grid[y : y + 32, x : x + 32], tile)
    caption = grid[y + 32 : y + 32 + text_h, x : x + 32]
    assert (caption < 128).any(), f"no text under image {i}"
  no_text = images.make_grid(tiles, None, columns=5, pad=0)
  assert no_text.shape == (32, 160, 3)


def test_grid_rejects_mismatched_input():
  with pytest.raises(ValueError, match="2 captions for 1 images"):
    images.make_grid([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])
  with pytest.raises(ValueError, match="all images must have shape"):
    images.make_grid([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])
