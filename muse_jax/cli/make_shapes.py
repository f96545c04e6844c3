"""Writes the synthetic shapes set as a folder source: PNG images and captions.jsonl.

Coloured circles, squares and triangles on white, captioned "a red circle", "three blue
squares" or "a red circle left of a blue square" (see muse_jax/data/shapes.py for the exact
convention). Example i is the same on every machine for the same --seed and --split, so
the folder can be regenerated; hold (colour, shape) pairs out of training with --held_out
and write the pairs never seen with --split=heldout; draw a shape more often with
--shape_weights.

  muse-jax make-shapes --n=10000 --size=64 --out=/tmp/shapes
  muse-jax make-shapes --n=1000 --out=/tmp/shapes_eval --held_out="purple triangle" --split=heldout
"""

from absl import app, flags

from muse_jax.data import shapes

_N = flags.DEFINE_integer("n", None, "Number of examples to write.", lower_bound=1)
_SIZE = flags.DEFINE_integer("size", 64, "Canvas side in pixels.", lower_bound=16)
_OUT = flags.DEFINE_string("out", None, "Output folder (created if missing).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the set; other seeds give other images.")
_START = flags.DEFINE_integer("start", 0, "Index of the first example.", lower_bound=0)
_SPLIT = flags.DEFINE_enum(
  "split", "train", shapes.SPLITS, "train: no held-out pair; heldout: only captions with one."
)
_HELD_OUT = flags.DEFINE_list(
  "held_out",
  [],
  'Comma-separated (colour shape) pairs held out of training, e.g. "purple triangle".',
)
_FORMS = flags.DEFINE_list(
  "forms",
  ["single=1", "count=1", "relation=1"],
  "Caption forms and their weights, as form=weight (single, count, relation).",
)
_SHAPE_WEIGHTS = flags.DEFINE_list(
  "shape_weights",
  ["circle=1", "square=1", "triangle=1"],
  "How often each shape is drawn, as shape=weight (circle, square, triangle); a shape left "
  "out is never drawn.",
)


def _parse_weights(items: list[str], flag: str, example: str) -> tuple[tuple[str, float], ...]:
  weights = []
  for item in items:
    name, _, weight = item.partition("=")
    try:
      weights.append((name.strip(), float(weight) if weight else 1.0))
    except ValueError:
      raise app.UsageError(f"--{flag} entry {item!r} is not name=weight (e.g. {example})") from None
  return tuple(weights)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _N.value is None or not _OUT.value:
    raise app.UsageError("--n and --out are required, e.g. --n=10000 --out=/tmp/shapes")
  try:
    source = shapes.ShapesSource(
      size=_SIZE.value,
      seed=_SEED.value,
      split=_SPLIT.value,
      forms=_parse_weights(_FORMS.value, "forms", "count=2"),
      shape_weights=_parse_weights(_SHAPE_WEIGHTS.value, "shape_weights", "square=2"),
      held_out=tuple(_HELD_OUT.value),
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  captions = shapes.write_folder(_OUT.value, _N.value, source, start=_START.value)
  print(f"wrote {_N.value} images and {captions}")
