"""The synthetic shapes set: coloured shapes on white, with captions any program can check.

An infinite, deterministic-by-index image-caption set that needs nothing from the network,
for the demo, the tests and quick experiments (issue 6). Example `i` is drawn from its own
random generator, seeded by `(seed, split, i)`, so any host or worker renders the same image
for the same index without coordination, and a resumed job sees the same data.

The convention, fixed so that anyone can judge an image against its caption:
- Square canvas of any size (default 64), white background (255, 255, 255).
- Colours: red (255,0,0), green (0,170,0), blue (0,0,255), yellow (255,220,0),
  purple (150,0,200), orange (255,128,0).
- Shapes, filled, no outline: circle, square (axis-aligned), triangle (upward isosceles,
  base at the bottom, as tall as it is wide). Each fills a square bounding box whose side (the
  diameter, side or base) is 15% to 40% of the canvas; objects lie fully inside the canvas,
  and no two bounding boxes overlap or touch: they are at least 4% of the canvas apart
  (at least 2 pixels), so that blur does not join them.
- Captions, exactly these forms:
    single:   `a {colour} {shape}`
    count:    `{two|three|four} {colour} {shape}s` (all objects alike)
    relation: `a {colour} {shape} {left of|right of|above|below} a {colour} {shape}`
              (two different objects; bounding-box centres at least 20% of the canvas apart
              along that axis, in the stated direction)
- Options: the weight of each form and of each shape, and (colour, shape) pairs held out of
  training. The `train` split never draws a held-out pair; the `heldout` split draws only
  captions that mention one, so compositional generalisation is measured on pairs never seen.

Rendering draws at 4x resolution and box-filters down, so edges are anti-aliased the way a
photograph's would be. `judge` (in `muse_jax.data.judge`) decides from pixels whether an
image shows its caption.
"""

from collections.abc import Iterable, Mapping
import dataclasses
import json
import os
import pathlib
import re

import numpy as np
from PIL import Image, ImageDraw
import tqdm

BACKGROUND = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
  "red": (255, 0, 0),
  "green": (0, 170, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 220, 0),
  "purple": (150, 0, 200),
  "orange": (255, 128, 0),
}
SHAPES = ("circle", "square", "triangle")
FORMS = ("single", "count", "relation")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "heldout", "all")

MIN_SIZE = 0.15  # smallest side / diameter, as a fraction of the canvas
MAX_SIZE = 0.40  # largest side / diameter
MIN_GAP = 0.04  # smallest distance between two bounding boxes (and at least 2 pixels)
MIN_RELATION_DISTANCE = 0.20  # smallest centre distance along a relation's axis
SUPERSAMPLE = 4  # rendering scale before the box filter (anti-aliasing)

Pair = tuple[str, str]  # (colour, shape)
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One drawn object; positions and sizes are fractions of the canvas side."""

  colour: str
  shape: str
  cx: float  # centre of the bounding box, 0 = left edge
  cy: float  # centre of the bounding box, 0 = top edge
  side: float  # side of the square bounding box

  @property
  def pair(self) -> Pair:
    return (self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
  """A caption and the objects that realise it."""

  form: str  # one of FORMS
  caption: str
  objects: tuple[ShapeObject, ...]


@dataclasses.dataclass(frozen=True)
class Description:
  """What a caption asks for: `count` objects of `pairs[0]`, or two objects in `relation`."""

  form: str
  pairs: tuple[Pair, ...]  # one pair (single, count) or two (relation, first is the subject)
  count: int  # number of objects in the image
  relation: str | None = None


# ----------------------------------------------------------------------------- captions


def caption_single(colour: str, shape: str) -> str:
  return f"a {colour} {shape}"


def caption_count(n: int, colour: str, shape: str) -> str:
  return f"{COUNT_WORDS[n]} {colour} {shape}s"


def caption_relation(a: Pair, relation: str, b: Pair) -> str:
  return f"a {a[0]} {a[1]} {relation} a {b[0]} {b[1]}"


_COLOUR_RE = "|".join(PALETTE)
_SHAPE_RE = "|".join(SHAPES)
_SINGLE = re.compile(rf"a ({_COLOUR_RE}) ({_SHAPE_RE})")
_COUNT = re.compile(rf"({'|'.join(COUNT_WORDS.values())}) ({_COLOUR_RE}) ({_SHAPE_RE})s")
_RELATION = re.compile(
  rf"a ({_COLOUR_RE}) ({_SHAPE_RE}) ({'|'.join(RELATIONS)}) a ({_COLOUR_RE}) ({_SHAPE_RE})"
)
_WORD_COUNTS = {word: n for n, word in COUNT_WORDS.items()}


def parse_caption(caption: str) -> Description:
  """Parses a caption of the shapes grammar.

  Args:
    caption: e.g. "a red circle", "three blue squares", "a red circle left of a blue square".

  Returns:
    The description the caption asks for.

  Raises:
    ValueError: the caption is not one of the three forms.
  """
  text = " ".join(caption.strip().lower().split())
  if m := _SINGLE.fullmatch(text):
    return Description("single", ((m[1], m[2]),), 1)
  if m := _COUNT.fullmatch(text):
    return Description("count", ((m[2], m[3]),), _WORD_COUNTS[m[1]])
  if m := _RELATION.fullmatch(text):
    return Description("relation", ((m[1], m[2]), (m[4], m[5])), 2, m[3])
  raise ValueError(
    f"caption {caption!r} is not in the shapes grammar; expected 'a {{colour}} {{shape}}', "
    "'{two|three|four} {colour} {shape}s' or "
    "'a {colour} {shape} {left of|right of|above|below} a {colour} {shape}' "
    f"with colours {list(PALETTE)} and shapes {list(SHAPES)}"
  )


def parse_pairs(pairs: Iterable[str | Pair]) -> frozenset[Pair]:
  """Reads held-out pairs given as "purple triangle" strings or ("purple", "triangle")."""
  out = set()
  for item in pairs:
    colour, shape = item.split() if isinstance(item, str) else item
    if colour not in PALETTE or shape not in SHAPES:
      raise ValueError(
        f"held-out pair {item!r} is not a (colour, shape) pair; expected a colour in "
        f"{list(PALETTE)} and a shape in {list(SHAPES)}"
      )
    out.add((colour, shape))
  return frozenset(out)


# ----------------------------------------------------------------------------- sampling


def _apart(a: ShapeObject, b: ShapeObject, gap: float) -> bool:
  """True when the bounding boxes are separated by at least `gap` along x or y."""
  reach = (a.side + b.side) / 2 + gap
  return abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach


def _in_relation(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
  d = MIN_RELATION_DISTANCE
  return {
    "left of": b.cx - a.cx >= d,
    "right of": a.cx - b.cx >= d,
    "above": b.cy - a.cy >= d,
    "below": a.cy - b.cy >= d,
  }[relation]


def _place(
  rng: np.random.Generator, pairs: list[Pair], size: int, relation: str | None
) -> tuple[ShapeObject, ...]:
  """Rejection-samples sizes and positions; shrinks the largest size if crowded."""
  gap = max(MIN_GAP, 2.0 / size)
  for attempt in range(2000):
    # Four large objects rarely fit at random; after a while draw smaller ones.
    largest = MAX_SIZE - (MAX_SIZE - MIN_SIZE) * min(1.0, attempt / 1000)
    objects = []
    for colour, shape in pairs:
      side = rng.uniform(MIN_SIZE, largest)
      cx, cy = rng.uniform(side / 2, 1 - side / 2, size=2)
      objects.append(ShapeObject(colour, shape, float(cx), float(cy), float(side)))
    if not all(_apart(a, b, gap) for i, a in enumerate(objects) for b in objects[i + 1 :]):
      continue
    if relation is not None and not _in_relation(objects[0], objects[1], relation):
      continue
    return tuple(objects)
  raise RuntimeError(f"could not place {pairs} on a {size}px canvas")  # never seen in practice


def _weights(
  given: Mapping[str, float] | None, names: tuple[str, ...], what: str
) -> dict[str, float]:
  """`given` completed to every name (missing ones weigh 0; None: all 1), checked."""
  weights = dict.fromkeys(names, 1.0) if given is None else dict.fromkeys(names, 0.0) | dict(given)
  if unknown := set(weights) - set(names):
    raise ValueError(f"unknown {what} {sorted(unknown)}; expected some of {names}")
  if negative := {k: w for k, w in weights.items() if w < 0}:
    raise ValueError(f"{what} weights must be >= 0; got {negative}")
  if not any(w > 0 for w in weights.values()):
    raise ValueError(f"every {what[:-1]} has weight 0: {dict(given or {})}")
  return weights


def _pick_pair(
  rng: np.random.Generator, options: list[Pair], shape_weights: dict[str, float]
) -> Pair:
  """One of `options`, each as likely as its shape's weight.

  Equal weights draw one integer, as the set did before it had shape weights, so that a set
  made with the default options is the same image for image.
  """
  weights = np.array([shape_weights[shape] for _, shape in options], np.float64)
  if np.all(weights == weights[0]):
    return options[rng.integers(len(options))]
  return options[rng.choice(len(options), p=weights / weights.sum())]


def sample_scene(
  rng: np.random.Generator,
  *,
  size: int = 64,
  forms: Mapping[str, float] | None = None,
  shape_weights: Mapping[str, float] | None = None,
  held_out: frozenset[Pair] = frozenset(),
  split: str = "train",
) -> Scene:
  """Draws one scene.

  Args:
    rng: the example's own generator.
    size: canvas side in pixels (only used to keep the 2-pixel gap on tiny canvases).
    forms: weight of each caption form; default all equal. Zero drops a form.
    shape_weights: weight of each shape; default all equal. Every (colour, shape) pair that
      the split allows is drawn with a probability proportional to its shape's weight, in
      every form; zero drops a shape. A set can give a shape that is harder to learn more
      of the examples (the demo: squares).
    held_out: (colour, shape) pairs to keep out of the `train` split.
    split: "train" (no held-out pair), "heldout" (captions that mention one) or "all".

  Returns:
    The scene; `render(scene, size)` draws it.
  """
  forms = _weights(forms, FORMS, "caption forms")
  shape_weights = _weights(shape_weights, SHAPES, "shapes")
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  everything = [(c, s) for c in PALETTE for s in SHAPES if shape_weights[s] > 0]
  if split == "heldout" and not held_out:
    raise ValueError("the 'heldout' split needs at least one held-out (colour, shape) pair")
  allowed = {
    "train": [p for p in everything if p not in held_out],
    "heldout": [p for p in sorted(held_out) if shape_weights[p[1]] > 0],
    "all": everything,
  }[split]
  if not allowed:
    raise ValueError(
      f"no (colour, shape) pair is left to draw: held out {sorted(held_out)}, "
      f"shapes of weight 0 {sorted(s for s, w in shape_weights.items() if w == 0)}"
    )

  names = [f for f in FORMS if forms[f] > 0]
  weights = np.array([forms[f] for f in names], np.float64)
  form = names[rng.choice(len(names), p=weights / weights.sum())]
  pick = lambda options: _pick_pair(rng, options, shape_weights)
  if form == "single":
    pair = pick(allowed)
    return Scene(form, caption_single(*pair), _place(rng, [pair], size, None))
  if form == "count":
    n = int(rng.integers(2, 5))
    pair = pick(allowed)
    return Scene(form, caption_count(n, *pair), _place(rng, [pair] * n, size, None))
  relation = RELATIONS[rng.integers(len(RELATIONS))]
  a = pick(allowed)
  # The other object is any pair the split allows; in "heldout" one held-out pair is enough.
  others = [p for p in (everything if split == "heldout" else allowed) if p != a]
  if not others:
    raise ValueError(f"relation captions need two different pairs; only {a} is allowed")
  b = pick(others)
  if split == "heldout" and rng.random() < 0.5:
    a, b = b, a  # the held-out pair is as often the object as the subject
  return Scene(form, caption_relation(a, relation, b), _place(rng, [a, b], size, relation))


# ----------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int = 64) -> np.ndarray:
  """Draws a scene: uint8 [S, S, 3], anti-aliased by drawing at 4x and box-filtering."""
  big = size * SUPERSAMPLE
  canvas = Image.new("RGB", (big, big), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for obj in scene.objects:
    x0, x1 = (obj.cx - obj.side / 2) * big, (obj.cx + obj.side / 2) * big
    y0, y1 = (obj.cy - obj.side / 2) * big, (obj.cy + obj.side / 2) * big
    fill = PALETTE[obj.colour]
    # PIL's boxes include their last pixel, hence the -1 (a side of s covers s pixels).
    if obj.shape == "circle":
      draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
      draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
      draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
  return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


# ----------------------------------------------------------------------------- the source


@dataclasses.dataclass(frozen=True)
class ShapesSource:
  """Random-access source of shapes examples (grain `RandomAccessDataSource` protocol).

  `source[i]` is `{"image": uint8 [S, S, 3], "caption": str, "key": str}`, the same on any
  machine for the same arguments. The set is infinite in spirit; `length` is only what a
  sampler needs to index it.
  """

  size: int = 64  # canvas side in pixels
  seed: int = 0  # different seeds give different sets
  split: str = "train"  # "train", "heldout" or "all"; see `sample_scene`
  forms: tuple[tuple[str, float], ...] = (("single", 1.0), ("count", 1.0), ("relation", 1.0))
  shape_weights: tuple[tuple[str, float], ...] = tuple((s, 1.0) for s in SHAPES)  # all alike
  held_out: tuple[str, ...] = ()  # "colour shape" pairs kept out of the train split
  length: int = 2**31 - 1  # number of indices

  def __post_init__(self):
    if self.size < 16:
      raise ValueError(f"shapes canvas size {self.size} is too small; expected at least 16")
    parse_pairs(self.held_out)  # fail early on a misspelled pair
    sample_scene(np.random.default_rng(0), **self._scene_kwargs())  # and on bad options

  def _scene_kwargs(self) -> dict:
    return dict(
      size=self.size,
      forms=dict(self.forms),
      shape_weights=dict(self.shape_weights),
      held_out=parse_pairs(self.held_out),
      split=self.split,
    )

  def __len__(self) -> int:
    return self.length

  def scene(self, index: int) -> Scene:
    if not 0 <= index < self.length:
      raise IndexError(f"shapes index {index} outside [0, {self.length})")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
    return sample_scene(rng, **self._scene_kwargs())

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    scene = self.scene(index)
    return {
      "image": render(scene, self.size),
      "caption": scene.caption,
      "key": f"shapes-{self.split}-{self.seed}-{index}",
    }


def write_folder(
  out_dir: str | os.PathLike, n: int, source: ShapesSource, *, start: int = 0, progress: bool = True
) -> pathlib.Path:
  """Writes examples `start .. start+n-1` as a folder source (PNG images + captions.jsonl).

  The layout is `out_dir/images/{index:08d}.png` and `out_dir/captions.jsonl` with one
  `{"file": ..., "caption": ..., "index": ...}` per line, plus `shapes.json` recording the
  options, so that the folder can be regenerated. PNG keeps the pixels exact for the judge.

  Returns:
    The path of captions.jsonl.
  """
  out = pathlib.Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  lines = []
  for index in tqdm.trange(start, start + n, desc="shapes", disable=not progress, unit="img"):
    example = source[index]
    name = f"images/{index:08d}.png"
    Image.fromarray(example["image"]).save(out / name, optimize=False, compress_level=1)
    lines.append(json.dumps({"file": name, "caption": example["caption"], "index": index}))
  options = dataclasses.asdict(source) | {"start": start, "n": n}
  (out / "shapes.json").write_text(json.dumps(options, indent=2) + "\n")
  captions = out / "captions.jsonl"
  tmp = out / "captions.jsonl.tmp"
  tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
  tmp.replace(captions)  # a folder with a captions file is always complete
  return captions


def judge(image, caption: str, **kwargs):
  """Decides from pixels whether `image` shows `caption`; see `muse_jax.data.judge.judge`."""
  from muse_jax.data import judge as judge_lib  # judge.py imports this module

  return judge_lib.judge(image, caption, **kwargs)
