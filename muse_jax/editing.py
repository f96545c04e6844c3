"""Pure helpers for editing (Muse §3.3): pixel masks to token masks, outpainting canvases.

Inpainting and outpainting mask the tokens whose image patch the edit region touches
and let the decode loop regenerate only those; every other token is known and kept.
A token covers an f x f pixel patch (f = the tokenizer's downsampling factor), so a
pixel mask becomes a token mask by "any pixel of the patch is masked".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")


def check_image(image: np.ndarray, size: int, name: str = "image") -> np.ndarray:
  """Checks a uint8 RGB image of ``size`` x ``size``; returns it as a numpy array."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8 RGB; got dtype {image.dtype}")
  if image.shape != (size, size, 3):
    raise ValueError(
      f"{name} must have shape ({size}, {size}, 3) for this pipeline; got {image.shape}"
    )
  return image


def check_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """A bool [size, size] edit mask (True = regenerate) from bool / 0-1 / 0-255 input."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] in (1, 3, 4):
    mask = mask[..., 0]
  if mask.shape != (size, size):
    raise ValueError(f"mask must have shape ({size}, {size}) like the image; got {mask.shape}")
  if mask.dtype == bool:
    return mask
  return mask > (127 if mask.dtype == np.uint8 and mask.max() > 1 else 0)


def token_mask(pixel_mask: np.ndarray, factor: int) -> np.ndarray:
  """bool [H, W] pixel mask -> bool [H/f, W/f]: a token is masked if any of its pixels is."""
  h, w = pixel_mask.shape
  if h % factor or w % factor:
    raise ValueError(f"mask size {(h, w)} is not a multiple of the token size {factor}")
  return pixel_mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))


def upsample_token_mask(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """bool [h, w] token mask -> bool ``grid`` (a finer token grid of the same image)."""
  h, w = mask.shape
  fy, fx = grid[0] // h, grid[1] // w
  if fy * h != grid[0] or fx * w != grid[1]:
    raise ValueError(f"token grid {grid} is not a multiple of {mask.shape}")
  return np.kron(mask, np.ones((fy, fx), bool)).astype(bool)


def outpaint_canvas(
  image: np.ndarray, directions: str | Sequence[str], size: int, multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """Shifts ``image`` away from ``directions`` by ``size`` pixels and masks the new border.

  The canvas keeps the image's size: outpainting to the right by 64 px shows the right
  part of the image moved 64 px left, with a fresh 64 px strip to generate on its
  right. ``size`` is rounded up to ``multiple`` (the token size) so that the strip
  covers whole tokens.

  Args:
    image: uint8 [S, S, 3].
    directions: "left", "right", "up", "down", or several of them.
    size: border width in pixels, 0 < size < S.
    multiple: round ``size`` up to a multiple of this.

  Returns:
    ``(canvas uint8 [S, S, 3], mask bool [S, S])``, mask True on the new border.
  """
  directions = (directions,) if isinstance(directions, str) else tuple(directions)
  bad = [d for d in directions if d not in DIRECTIONS]
  if bad or not directions:
    raise ValueError(f"outpaint directions must be some of {DIRECTIONS}; got {list(directions)}")
  if {"left", "right"} <= set(directions) or {"up", "down"} <= set(directions):
    raise ValueError(
      f"outpaint directions {list(directions)} pull opposite ways; pick one per axis"
    )
  s = image.shape[0]
  rounded = -(-int(size) // multiple) * multiple  # up to whole tokens
  if not 0 < rounded < s:
    note = f" ({rounded} when rounded up to a multiple of {multiple})" if rounded != size else ""
    raise ValueError(f"outpaint size must be in (0, {s}) pixels; got {size}{note}")
  size = rounded
  canvas = np.full_like(image, 127)
  mask = np.zeros((s, s), bool)
  dy = size * (("down" in directions) - ("up" in directions))
  dx = size * (("right" in directions) - ("left" in directions))
  # The source window that stays visible, and where it goes on the canvas.
  src_y, dst_y = (slice(dy, s), slice(0, s - dy)) if dy >= 0 else (slice(0, s + dy), slice(-dy, s))
  src_x, dst_x = (slice(dx, s), slice(0, s - dx)) if dx >= 0 else (slice(0, s + dx), slice(-dx, s))
  canvas[dst_y, dst_x] = image[src_y, src_x]
  mask[:] = True
  mask[dst_y, dst_x] = False
  return canvas, mask
