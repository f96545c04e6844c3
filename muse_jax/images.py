"""Image helpers: model range <-> uint8, loading user images, PNGs and captioned grids."""

from __future__ import annotations

from collections.abc import Sequence
import os
import pathlib
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] (any leading dims, channels last) -> uint8 [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 in [-1, 1]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images; got dtype {images.dtype}")
  return images.astype(np.float32) / 127.5 - 1.0


def load_rgb(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """Reads an image file as uint8 RGB [H, W, 3], optionally resized (shorter side) and
  center-cropped to ``size`` x ``size``.

  Raises:
    ValueError: naming the file when it is not an image Pillow can read.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no image at {path}")
  try:
    with Image.open(path) as im:
      im.load()
      rgb = im.convert("RGB")
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None
  if size is not None:
    rgb = center_crop(rgb, size)
  return np.asarray(rgb)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """Resizes the shorter side to ``size`` (bicubic) and crops the center square."""
  w, h = image.size
  scale = size / min(w, h)
  if scale != 1.0:
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  return image.crop((left, top, left + size, top + size))


def save_png(image: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
  """Saves one uint8 [H, W, 3] image; creates the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
  return path


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no file needed.
  except TypeError:  # Pillow built without FreeType
    return ImageFont.load_default()


def make_grid(
  images: Sequence[np.ndarray] | np.ndarray,
  captions: Sequence[str] | None = None,
  *,
  columns: int | None = None,
  pad: int = 4,
  caption_lines: int = 2,
) -> np.ndarray:
  """Tiles uint8 [H, W, 3] images into one grid, with each caption written under its image.

  Args:
    images: N images of one size.
    captions: N strings (or None for no text).
    columns: images per row; default ⌈√N⌉.
    pad: white pixels between tiles.
    caption_lines: lines of text kept per caption (longer ones are cut with "…").

  Returns:
    uint8 [rows·(H + text + pad) + pad, columns·(W + pad) + pad, 3].
  """
  images = [np.asarray(im, np.uint8) for im in images]
  if not images:
    raise ValueError("make_grid needs at least one image")
  h, w = images[0].shape[:2]
  if any(im.shape != images[0].shape for im in images):
    raise ValueError(
      f"all images must have shape {images[0].shape}; got {sorted({im.shape for im in images})}"
    )
  if captions is not None and len(captions) != len(images):
    raise ValueError(f"got {len(captions)} captions for {len(images)} images")
  n = len(images)
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  font_size = max(10, min(16, w // 12))
  font = _font(font_size)
  text_h = (font_size + 3) * caption_lines + 4 if captions is not None else 0
  canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + text_h + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  chars_per_line = max(8, int(w / (0.55 * font_size)))
  for i, im in enumerate(images):
    x = pad + (i % columns) * (w + pad)
    y = pad + (i // columns) * (h + text_h + pad)
    canvas.paste(Image.fromarray(im), (x, y))
    if captions is not None:
      lines = textwrap.wrap(captions[i], chars_per_line) or [""]
      if len(lines) > caption_lines:
        lines = [*lines[: caption_lines - 1], lines[caption_lines - 1][: chars_per_line - 1] + "…"]
      for j, line in enumerate(lines):
        draw.text((x + 2, y + h + 2 + j * (font_size + 3)), line, fill="black", font=font)
  return np.asarray(canvas)
