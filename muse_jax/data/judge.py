"""The shapes judge: decides from pixels whether an image shows its shapes caption.

The convention (`muse_jax.data.shapes`) makes every fact in a caption measurable:
- Objects are the pixels far from the white background: every palette colour has a channel
  at 0, so an object pixel is at 255 from white in some channel, and an edge pixel half
  covered is at ~128. Thresholding there keeps an object's size under symmetric blur.
- Count by connected components (8-connected) of that mask, ignoring specks smaller than a
  quarter of the smallest object the set draws.
- Shape by the fill ratio of each component's bounding box: a triangle fills 1/2, a circle
  pi/4 ~ 0.785, a square 1; the cuts sit half-way (0.64, 0.89). A triangle must also carry
  its mass low (normalised row skew below -0.4, where a circle or square has 0), and a
  circle or square must not: a component that is neither (a ragged blob, noise) is
  "irregular" and matches no caption.
- Colour by the palette entry nearest to the median of the component's core pixels (those
  at least 200 from white), which blur and anti-aliasing leave untouched; a median further
  than 80 (Euclidean, 0-255) from every entry, such as noise's grey, is "other".
- Relations by component centroids: "A left of B" needs A's centroid left of B's by at
  least `relation_margin` of the canvas.
An image shows its caption when it holds exactly the objects the caption names and no
others, in the stated relation.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np
from PIL import Image

from muse_jax.data import shapes

_OBJECT_LEVEL = 128  # distance from white above which a pixel belongs to an object
_CORE_LEVEL = 200  # distance from white above which a pixel shows the object's own colour
_TRIANGLE_CIRCLE_CUT = (0.5 + np.pi / 4) / 2  # ~0.64
_CIRCLE_SQUARE_CUT = (np.pi / 4 + 1.0) / 2  # ~0.89
_TRIANGLE_SKEW_CUT = -0.4  # a triangle's normalised skew is -1, a circle's or square's 0
_COLOUR_TOLERANCE = 80.0  # half the red-orange distance is 64: nearest stays unambiguous
_HALO = 2  # pixels around an object whose partial coverage still belongs to it
_MAX_SIDE = 256  # larger images are box-filtered down first; the judge needs no more
_PALETTE = np.array(list(shapes.PALETTE.values()), np.float32)  # [C, 3]
_COLOURS = list(shapes.PALETTE)


@dataclasses.dataclass(frozen=True)
class Detection:
  """One object found in an image; positions are fractions of the image side."""

  colour: str
  shape: str
  cx: float  # centroid, 0 = left edge
  cy: float  # centroid, 0 = top edge
  fill: float  # area / bounding-box area
  skew: float  # third moment of the rows, normalised: -1 for a triangle, 0 circle or square
  area: float  # fraction of the image

  def __str__(self) -> str:
    return f"{self.colour} {self.shape} at ({self.cx:.2f}, {self.cy:.2f})"


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The judge's answer: truthy when the image shows the caption, with the reason if not."""

  ok: bool
  reason: str = ""
  detections: tuple[Detection, ...] = ()

  def __bool__(self) -> bool:
    return self.ok


def to_rgb_uint8(image) -> np.ndarray:
  """Accepts a PIL image, uint8 [H, W, 3], or float [H, W, 3] in the model's range [-1, 1]."""
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3]; got shape {image.shape}")
  if image.dtype == np.uint8:
    return image
  if np.issubdtype(image.dtype, np.floating):
    return np.clip(np.round((image.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  raise ValueError(f"expected uint8 or float pixels in [-1, 1]; got dtype {image.dtype}")


def _pad(a: np.ndarray, value) -> np.ndarray:
  """`np.pad(a, 1, constant_values=value)` for 2-D arrays, without its overhead."""
  out = np.full((a.shape[0] + 2, a.shape[1] + 2), value, a.dtype)
  out[1:-1, 1:-1] = a
  return out


def label_components(mask: np.ndarray) -> np.ndarray:
  """8-connected component labels of a boolean mask, without scipy.

  Each pixel starts with its own flat index as label; every round takes the minimum over
  the 3x3 neighbourhood and then follows labels as pointers (pointer jumping), so labels
  reach each component's smallest index in a number of rounds that grows with the log of
  its diameter, not the diameter itself.

  Returns:
    int64 [H, W]: -1 on background, else the smallest flat index in the pixel's component.
  """
  h, w = mask.shape
  none = h * w  # larger than any index
  labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
  while True:
    padded = _pad(labels, none)
    new = labels
    for dy in range(3):
      for dx in range(3):
        new = np.minimum(new, padded[dy : dy + h, dx : dx + w])
    new = np.where(mask, new, none)
    flat = new.reshape(-1)
    inside = flat < none
    for _ in range(4):
      flat[inside] = flat[flat[inside]]
    if np.array_equal(new, labels):
      return np.where(mask, labels, -1)
    labels = new


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
  """Grows a boolean mask by `steps` pixels (8-connected)."""
  for _ in range(steps):
    p = _pad(mask, False)
    mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    mask |= p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
  return mask


IRREGULAR = "irregular"  # a component that is none of the shapes; it matches no caption
OTHER_COLOUR = "other"  # a component whose colour is none of the palette's


def _classify(fill: float, skew: float) -> str:
  low = skew < _TRIANGLE_SKEW_CUT
  if fill < _TRIANGLE_CIRCLE_CUT:
    return "triangle" if low else IRREGULAR
  if low:  # bottom-heavy but full: a blurred triangle, else a blob
    return "triangle" if fill < _CIRCLE_SQUARE_CUT else IRREGULAR
  return "circle" if fill < _CIRCLE_SQUARE_CUT else "square"


def detect(image) -> list[Detection]:
  """Finds the objects in an image, ordered top to bottom, then left to right."""
  rgb = to_rgb_uint8(image)
  if max(rgb.shape[:2]) > _MAX_SIDE:
    rgb = np.asarray(Image.fromarray(rgb).resize((_MAX_SIDE, _MAX_SIDE), Image.Resampling.BOX))
  h, w = rgb.shape[:2]
  strength = 255.0 - rgb.min(axis=-1).astype(np.float32)  # distance from white, [H, W]
  mask = strength >= _OBJECT_LEVEL
  labels = label_components(mask)
  ids, areas = np.unique(labels[mask], return_counts=True)
  smallest = 0.5 * (shapes.MIN_SIZE * h) * (shapes.MIN_SIZE * w)  # a smallest triangle
  # Coverage: 0 on the background (its own level, measured away from objects), 1 inside.
  far = ~_dilate(mask, _HALO)
  background = float(np.median(strength[far])) if far.any() else 0.0
  coverage = np.clip((strength - background) / (255.0 - background), 0.0, 1.0)

  found = []
  for label in ids[areas >= smallest / 4]:
    own = labels == label
    ys, xs = np.nonzero(own)
    y0, y1 = max(ys.min() - _HALO, 0), min(ys.max() + _HALO + 1, h)
    x0, x1 = max(xs.min() - _HALO, 0), min(xs.max() + _HALO + 1, w)
    own, near = own[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    # The object's halo, less what lies as close to another object.
    region = own | (_dilate(own, _HALO) & ~_dilate(near & ~own, _HALO))
    c = np.where(region, coverage[y0:y1, x0:x1], 0.0)  # [h', w']
    area = float(c.sum())
    side = max(c.sum(0).max(), c.sum(1).max())  # widest column or row: the box side
    gy, gx = np.mgrid[y0:y1, x0:x1]
    cy, cx = float((c * gy).sum() / area), float((c * gx).sum() / area)
    skew = float((c * (gy - cy) ** 3).sum() / area) / (2 * area) ** 1.5 * 135
    pixels = rgb[y0:y1, x0:x1][own]
    core = pixels[strength[y0:y1, x0:x1][own] >= _CORE_LEVEL]
    colour = np.median(core if len(core) >= 3 else pixels, axis=0)
    distance = np.sqrt(((_PALETTE - colour) ** 2).sum(-1))  # [C]
    nearest = int(np.argmin(distance))
    fill = area / side**2
    found.append(
      Detection(
        _COLOURS[nearest] if distance[nearest] <= _COLOUR_TOLERANCE else OTHER_COLOUR,
        _classify(fill, skew),
        cx=(cx + 0.5) / w,
        cy=(cy + 0.5) / h,
        fill=fill,
        skew=skew,
        area=area / (h * w),
      )
    )
  return sorted(found, key=lambda d: (round(d.cy, 1), d.cx))


def _relation_holds(a: Detection, b: Detection, relation: str, margin: float) -> bool:
  return {
    "left of": b.cx - a.cx >= margin,
    "right of": a.cx - b.cx >= margin,
    "above": b.cy - a.cy >= margin,
    "below": a.cy - b.cy >= margin,
  }[relation]


def judge(image, caption: str, *, relation_margin: float = 0.05) -> Verdict:
  """Decides from pixels whether an image shows its shapes caption.

  Args:
    image: PIL image, uint8 [H, W, 3], or float [H, W, 3] in [-1, 1] (a model's output).
    caption: a caption of the shapes grammar (see `muse_jax.data.shapes`).
    relation_margin: how far apart (fraction of the image) two centroids must be along the
      relation's axis; the set draws them at least 0.2 apart (bounding-box centres).

  Returns:
    A `Verdict`, truthy when the image holds exactly the named objects in the named
    relation; otherwise `.reason` says what differs.

  Raises:
    ValueError: the caption is not in the grammar, or the image is not RGB.
  """
  want = shapes.parse_caption(caption)
  found = detect(image)
  listing = ", ".join(map(str, found)) or "nothing"
  fail = lambda reason: Verdict(False, reason, tuple(found))
  if len(found) != want.count:
    return fail(f"expected {want.count} object(s), found {len(found)}: {listing}")

  if want.form in ("single", "count"):
    colour, shape = want.pairs[0]
    for d in found:
      if (d.colour, d.shape) != (colour, shape):
        return fail(f"expected only {colour} {shape}s, found {d}; all: {listing}")
    return Verdict(True, "", tuple(found))

  a, b = want.pairs
  assignments = [(x, y) for x in found for y in found if x is not y]
  named = [(x, y) for x, y in assignments if (x.colour, x.shape) == a and (y.colour, y.shape) == b]
  if not named:
    return fail(f"expected a {' '.join(a)} and a {' '.join(b)}, found {listing}")
  for x, y in named:
    if _relation_holds(x, y, want.relation, relation_margin):
      return Verdict(True, "", tuple(found))
  x, y = named[0]
  return fail(f"the {x} is not {want.relation} the {y} (margin {relation_margin:.2f})")


def accuracy(images: Sequence, captions: Sequence[str]) -> float:
  """Fraction of images that show their captions."""
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  return float(np.mean([bool(judge(im, c)) for im, c in zip(images, captions, strict=True)]))
