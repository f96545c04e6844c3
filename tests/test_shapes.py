"""Tests of the synthetic shapes set: the convention, determinism, held-out pairs, the judge."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageFilter
import pytest

from muse_jax.data import judge as judge_lib
from muse_jax.data import shapes


def _scenes(n, seed=0, **kwargs):
  src = shapes.ShapesSource(seed=seed, **kwargs)
  return [src.scene(i) for i in range(n)]


def test_deterministic_by_index():
  a, b = shapes.ShapesSource(seed=7), shapes.ShapesSource(seed=7)
  for i in (0, 1, 12345, 2**31 - 2):
    x, y = a[i], b[i]
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["caption"] == y["caption"]
  assert a[3]["caption"] != a[4]["caption"] or not np.array_equal(a[3]["image"], a[4]["image"])
  assert not np.array_equal(a[0]["image"], shapes.ShapesSource(seed=8)[0]["image"])
  with pytest.raises(IndexError):
    a.scene(2**31 - 1)


def test_scenes_follow_the_convention():
  size = 64
  gap = max(shapes.MIN_GAP, 2 / size)
  seen = collections.Counter()
  for scene in _scenes(600, seed=1, size=size):
    want = shapes.parse_caption(scene.caption)
    assert want.form == scene.form and want.count == len(scene.objects)
    seen[scene.form] += 1
    for o in scene.objects:
      assert o.colour in shapes.PALETTE and o.shape in shapes.SHAPES
      assert shapes.MIN_SIZE <= o.side <= shapes.MAX_SIZE
      assert o.side / 2 <= o.cx <= 1 - o.side / 2 and o.side / 2 <= o.cy <= 1 - o.side / 2
    for i, a in enumerate(scene.objects):
      for b in scene.objects[i + 1 :]:
        reach = (a.side + b.side) / 2 + gap
        assert abs(a.cx - b.cx) >= reach or abs(a.cy - b.cy) >= reach, scene
    if scene.form == "count":
      assert len({o.pair for o in scene.objects}) == 1
    if scene.form == "relation":
      a, b = scene.objects
      assert a.pair == want.pairs[0] and b.pair == want.pairs[1] and a.pair != b.pair
      dx, dy = b.cx - a.cx, b.cy - a.cy
      distance = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[want.relation]
      assert distance >= shapes.MIN_RELATION_DISTANCE
  assert set(seen) == set(shapes.FORMS)


def test_render_uses_the_exact_palette_on_white():
  scene = shapes.Scene(
    "relation",
    "a orange square left of a purple circle",
    (
      shapes.ShapeObject("orange", "square", 0.25, 0.5, 0.3),
      shapes.ShapeObject("purple", "circle", 0.75, 0.5, 0.3),
    ),
  )
  image = shapes.render(scene, 64)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert tuple(image[0, 0]) == (255, 255, 255)
  assert tuple(image[32, 16]) == shapes.PALETTE["orange"]
  assert tuple(image[32, 48]) == shapes.PALETTE["purple"]
  # The square covers side^2 of the canvas: 0.09 * 64^2 pixels (anti-aliased edges count half).
  orange = np.all(image == shapes.PALETTE["orange"], axis=-1).sum()
  assert abs(orange - 0.09 * 64**2) <= 4 * 0.3 * 64


def test_held_out_pairs_and_form_weights():
  held = ("purple triangle", "red circle")
  pairs = shapes.parse_pairs(held)
  forms = (("single", 1.0), ("count", 0.0), ("relation", 3.0))
  train = _scenes(1500, seed=2, held_out=held, forms=forms)
  assert not any(o.pair in pairs for s in train for o in s.objects)
  frequency = collections.Counter(s.form for s in train)
  assert frequency["count"] == 0 and abs(frequency["relation"] / 1500 - 0.75) < 0.04
  heldout = _scenes(300, seed=2, held_out=held, split="heldout")
  assert all(any(p in pairs for p in shapes.parse_caption(s.caption).pairs) for s in heldout)
  with pytest.raises(ValueError, match="pink"):
    shapes.ShapesSource(held_out=("pink circle",))
  with pytest.raises(ValueError, match="heldout"):
    shapes.ShapesSource(split="heldout")


def test_shape_weights():
  weighted = (("circle", 1.0), ("square", 3.0), ("triangle", 1.0))
  scenes = _scenes(2000, seed=5, shape_weights=weighted, held_out=("red square",))
  frequency = collections.Counter(o.shape for s in scenes for o in s.objects[:1])
  # Squares have 5 allowed colours, circles and triangles 6: 15 / (15 + 6 + 6) of the draws.
  assert abs(frequency["square"] / 2000 - 15 / 27) < 0.04, frequency
  assert not any(o.pair == ("red", "square") for s in scenes for o in s.objects)
  # A shape of weight 0 is never drawn, in any form; a shape left out weighs 0.
  for weights in (
    (("circle", 1.0), ("square", 0.0), ("triangle", 2.0)),
    (("circle", 1.0), ("triangle", 2.0)),
  ):
    assert not any(
      o.shape == "square" for s in _scenes(300, seed=5, shape_weights=weights) for o in s.objects
    )
  # Equal weights, whatever their value, draw the set of the default options.
  equal = _scenes(50, seed=5, shape_weights=(("circle", 2.0), ("square", 2.0), ("triangle", 2.0)))
  assert equal == _scenes(50, seed=5)
  with pytest.raises(ValueError, match="hexagon"):
    shapes.ShapesSource(shape_weights=(("hexagon", 1.0),))
  with pytest.raises(ValueError, match=r"weights must be >= 0; got \{'square': -1.0\}"):
    shapes.ShapesSource(shape_weights=(("square", -1.0),))
  with pytest.raises(ValueError, match="every shape has weight 0"):
    shapes.ShapesSource(shape_weights=(("square", 0.0),))
  with pytest.raises(ValueError, match="no \\(colour, shape\\) pair is left"):
    shapes.ShapesSource(split="heldout", held_out=("red square",), shape_weights=(("circle", 1.0),))


def test_parse_caption_rejects_other_text():
  assert shapes.parse_caption("Three  blue squares").count == 3
  with pytest.raises(ValueError, match="not in the shapes grammar"):
    shapes.parse_caption("a red hexagon")


def test_label_components_matches_flood_fill():
  rng = np.random.default_rng(0)
  for _ in range(20):
    mask = rng.random((23, 31)) < 0.45
    labels = judge_lib.label_components(mask)
    # Reference: breadth-first flood fill, 8-connected.
    ref = -np.ones(mask.shape, int)
    for start in zip(*np.nonzero(mask), strict=True):
      if ref[start] >= 0:
        continue
      queue, ref[start] = [start], start[0] * mask.shape[1] + start[1]
      while queue:
        y, x = queue.pop()
        for yy in range(y - 1, y + 2):
          for xx in range(x - 1, x + 2):
            inside = 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]
            if inside and mask[yy, xx] and ref[yy, xx] < 0:
              ref[yy, xx] = ref[start]
              queue.append((yy, xx))
    np.testing.assert_array_equal(labels, ref)


@pytest.mark.parametrize("form", shapes.FORMS)
def test_judge_is_right_on_fresh_renders(form):
  src = shapes.ShapesSource(seed=11, forms=((form, 1.0),))
  verdicts = [shapes.judge(e["image"], e["caption"]) for e in map(src.__getitem__, range(1000))]
  wrong = [v.reason for v in verdicts if not v]
  assert len(wrong) <= 10, wrong[:5]


def _blur(a):
  return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1.0)))


def _noise(a):
  return np.clip(a + np.random.default_rng(0).normal(0, 8, a.shape), 0, 255).astype(np.uint8)


def _down_up(a):
  small = Image.fromarray(a).resize((32, 32), Image.Resampling.BICUBIC)
  return np.asarray(small.resize((64, 64), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("degrade", [_blur, _noise, _down_up, lambda a: _noise(_blur(a))])
def test_judge_tolerates_blur_and_noise(degrade):
  src = shapes.ShapesSource(seed=12)
  examples = [src[i] for i in range(200)]
  right = [bool(judge_lib.judge(degrade(e["image"]), e["caption"])) for e in examples]
  assert np.mean(right) >= 0.98
  # And on the model's float range.
  floats = examples[0]["image"].astype(np.float32) / 127.5 - 1
  assert judge_lib.judge(floats, examples[0]["caption"])


def _wrong_captions(scene: shapes.Scene) -> dict[str, str]:
  """One caption per kind of mistake, each false for this scene."""
  want = shapes.parse_caption(scene.caption)
  colour, shape = want.pairs[0]
  other_colour = next(c for c in shapes.PALETTE if c != colour)
  other_shape = next(s for s in shapes.SHAPES if s != shape)
  if want.form == "relation":
    (c1, s1), (c2, s2) = want.pairs
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    return {
      "colour": shapes.caption_relation((other_colour, s1), want.relation, (c2, s2)),
      "shape": shapes.caption_relation((c1, other_shape), want.relation, (c2, s2)),
      "relation": shapes.caption_relation((c1, s1), opposite[want.relation], (c2, s2)),
      "count": shapes.caption_count(2, c1, s1),
    }
  n = want.count
  return {
    "colour": shapes.caption_count(n, other_colour, shape)
    if n > 1
    else shapes.caption_single(other_colour, shape),
    "shape": shapes.caption_count(n, colour, other_shape)
    if n > 1
    else shapes.caption_single(colour, other_shape),
    "count": shapes.caption_count(n + 1 if n < 4 else 2, colour, shape),
  }


def test_judge_rejects_wrong_captions():
  src = shapes.ShapesSource(seed=13)
  accepted = collections.Counter()
  total = collections.Counter()
  for i in range(300):
    scene, image = src.scene(i), src[i]["image"]
    for kind, caption in _wrong_captions(scene).items():
      verdict = judge_lib.judge(image, caption)
      total[kind] += 1
      accepted[kind] += bool(verdict)
      assert verdict or verdict.reason
  assert set(total) == {"colour", "shape", "count", "relation"}
  for kind in total:
    assert accepted[kind] <= 0.01 * total[kind], (kind, accepted[kind], total[kind])


def _not_a_shape(kind: str, colour: tuple[int, int, int]) -> np.ndarray:
  """A palette-coloured figure that is no circle, square or triangle.

  (Figures with holes are out of the judge's reach: it measures solid figures.)
  """
  image = np.full((64, 64, 3), 255, np.uint8)
  yy, xx = np.mgrid[:64, :64]
  figure = {
    "plus": ((np.abs(yy - 32) <= 3) & (np.abs(xx - 32) <= 11))
    | ((np.abs(xx - 32) <= 3) & (np.abs(yy - 32) <= 11)),
    "bar": (np.abs(yy - 32) <= 2) & (np.abs(xx - 32) <= 12),
  }[kind]
  image[figure] = colour
  return image


def test_judge_accepts_no_noise_or_other_figures():
  rng = np.random.default_rng(0)
  captions = [shapes.caption_single(c, s) for c in shapes.PALETTE for s in shapes.SHAPES]
  images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(10)]
  images += [_not_a_shape(k, c) for k in ("plus", "bar") for c in shapes.PALETTE.values()]
  accepted = [(i, c) for i, im in enumerate(images) for c in captions if judge_lib.judge(im, c)]
  assert not accepted
  noise = judge_lib.judge(images[0], "a green square")
  assert not noise and ("other" in noise.reason or "expected 1" in noise.reason), noise.reason


def test_verdict_explains_itself():
  image = shapes.render(
    shapes.Scene("single", "a red circle", (shapes.ShapeObject("red", "circle", 0.5, 0.5, 0.3),)),
    64,
  )
  assert judge_lib.judge(image, "a red circle")
  no = judge_lib.judge(image, "a blue circle")
  assert not no and no.detections[0].colour == "red"
  assert no.reason.startswith("expected only blue circles, found red circle at (0.50, 0.50)")
  assert "expected 2" in judge_lib.judge(image, "two red circles").reason
  assert judge_lib.accuracy([image, image], ["a red circle", "a red square"]) == 0.5


def test_write_folder(tmp_path):
  src = shapes.ShapesSource(size=32, seed=3)
  captions = shapes.write_folder(tmp_path, 5, src, start=10, progress=False)
  rows = [json.loads(line) for line in captions.read_text().splitlines()]
  assert [r["index"] for r in rows] == list(range(10, 15))
  for r in rows:
    image = np.asarray(Image.open(tmp_path / r["file"]))
    np.testing.assert_array_equal(image, src[r["index"]]["image"])
    assert r["caption"] == src[r["index"]]["caption"]


def _make_shapes(*flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "muse_jax.main", "make-shapes", *flags]
  return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_make_shapes_command(tmp_path):
  done = _make_shapes(
    "--n=6", "--size=32", f"--out={tmp_path}", "--shape_weights=square=1", "--forms=single=1"
  )
  assert done.returncode == 0, done.stderr
  rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
  assert len(rows) == 6 and all(
    shapes.parse_caption(r["caption"]).pairs[0][1] == "square" for r in rows
  )
  options = json.loads((tmp_path / "shapes.json").read_text())
  assert options["shape_weights"] == [["square", 1.0]] and options["forms"] == [["single", 1.0]]
  for flag, message in [
    ("--shape_weights=hexagon=1", "unknown shapes ['hexagon']"),
    ("--shape_weights=square=many", "--shape_weights entry 'square=many' is not name=weight"),
  ]:
    done = _make_shapes("--n=1", f"--out={tmp_path / 'bad'}", flag)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
