"""How far each trained stage of a demo run lets the judge go: the demo's diagnosis.

The demo (``muse-jax demo``) judges images generated from a prompt alone. When too few
pass, this says which stage falls short. It takes fresh single-object images of the
training split (indices far past the pre-encoded ones) and reports, by object size and
by shape:

1. the tokenizer's ceiling: each image encoded and decoded, the judge on the
   reconstruction, with the tokenizer's own decoder and, when the run trained one, the
   decoder stage's (which is trained for the base's tokens, not an encoder's);
2. the base transformer given the layout: the object's box (grown by 1/16 of the
   canvas) is masked and inpainted with the image's own caption, everything else known
   (the pipeline's ``inpaint``, with the run's sampler settings). This separates drawing
   the shape from choosing where it goes.

With the commonest failures of each, as (asked, found) pairs.

  python benchmarks/demo_ceilings.py --workdir /tmp/muse_demo
  python benchmarks/demo_ceilings.py --workdir /tmp/muse_demo --n 48 --skip-inpainting
  python benchmarks/demo_ceilings.py --workdir /tmp/muse_demo --n 600 --skip-inpainting --equal-shapes
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIRST_INDEX = 10**6  # past any pre-encoded training example
SIZE_NAMES = ("small", "mid", "large")  # thirds of the shapes set's size range


def demo_config(workdir: pathlib.Path):
  """The config the run was made with (its report.json), else the demo's default."""
  import ml_collections

  from configs import demo
  from muse_jax.data import shapes

  report = workdir / "report.json"
  if not report.is_file():
    return demo.get_config()
  config = ml_collections.ConfigDict(json.loads(report.read_text())["config"])
  if "shape_weights" not in config:  # a run from before the weights drew every shape alike
    config.shape_weights = dict.fromkeys(shapes.SHAPES, 1.0)
  return config


def size_class(side: float) -> str:
  from muse_jax.data import shapes

  third = (side - shapes.MIN_SIZE) / (shapes.MAX_SIZE - shapes.MIN_SIZE) * 3
  return SIZE_NAMES[min(2, max(0, int(third)))]


def failure(verdict, caption: str) -> str:
  """'asked -> found': 'square -> circle', 'triangle -> 0 objects', 'circle -> colour orange'.

  Read from the verdict's detections (single-object captions), not from its reason's wording.
  """
  colour, asked = caption.split()[-2:]
  found = verdict.detections
  if len(found) != 1:
    return f"{asked} -> {len(found)} objects"
  if found[0].shape != asked:
    return f"{asked} -> {found[0].shape}"
  if found[0].colour != colour:
    return f"{asked} -> colour {found[0].colour}"
  return f"{asked} -> {verdict.reason}"


class Tally:
  def __init__(self):
    self.by_size = collections.defaultdict(lambda: [0, 0])
    self.by_shape = collections.defaultdict(lambda: [0, 0])
    self.failures = collections.Counter()

  def add(self, verdict, caption: str, side: float) -> None:
    for cell in (self.by_size[size_class(side)], self.by_shape[caption.split()[-1]]):
      cell[0] += bool(verdict)
      cell[1] += 1
    if not verdict:
      self.failures[failure(verdict, caption)] += 1

  def line(self, name: str) -> str:
    passed = sum(c[0] for c in self.by_size.values())
    total = sum(c[1] for c in self.by_size.values())
    cells = lambda tally: "  ".join(f"{k} {p}/{n}" for k, (p, n) in tally if n)
    sizes = cells((s, self.by_size[s]) for s in SIZE_NAMES)
    kinds = cells(sorted(self.by_shape.items()))
    worst = ", ".join(f"{k} x{v}" for k, v in self.failures.most_common(4))
    return (
      f"{name:<28} {passed:>4}/{total:<4} {passed / total:6.1%}   {sizes}   {kinds}\n"
      f"{'':<30}failures: {worst or '-'}"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished `muse-jax demo` workdir")
  parser.add_argument("--n", type=int, default=192, help="single-object images judged")
  parser.add_argument("--skip-inpainting", action="store_true", help="the tokenizer only")
  parser.add_argument(
    "--equal-shapes",
    action="store_true",
    help="draw every shape alike, whatever the run's shape_weights: the same images for "
    "runs trained with different weights",
  )
  args = parser.parse_args()
  if args.n < 1:
    parser.error(f"--n must be at least 1; got {args.n}")

  from muse_jax import losses, runs
  from muse_jax.data import shapes
  from muse_jax.demo import build, evaluate
  from muse_jax.vq_tokenizer import load_tokenizer

  workdir = pathlib.Path(args.workdir)
  config = demo_config(workdir)
  if args.equal_shapes:
    config.shape_weights = dict.fromkeys(shapes.SHAPES, 1.0)
  source = build.shapes_source(config, split="train")
  indices, scenes, i = [], [], FIRST_INDEX
  while len(indices) < args.n:
    if (scene := source.scene(i)).form == "single":
      indices.append(i)
      scenes.append(scene)
    i += 1
  pictures = np.stack([source[i]["image"] for i in indices])  # uint8 [n, S, S, 3]
  pipeline = runs.load_pipeline(workdir)
  print(f"demo run {workdir}: {args.n} fresh single-object images of the training split")

  # The tokenizer's own decoder, and the one the pipeline draws with when the run trained
  # a second (the decoder stage): same encoder and codes.
  decoders = {"tokenizer": pipeline.tokenizer}
  if runs.read_layout(workdir)["tokenizer"] != workdir / build.TOKENIZER:
    decoders = {
      "tokenizer": load_tokenizer(workdir / build.TOKENIZER),
      "decoder stage": pipeline.tokenizer,
    }
  ids = np.asarray(pipeline.tokenizer.encode(pictures))
  codes, counts = np.unique(ids, return_counts=True)
  p = counts / counts.sum()
  print(
    f"tokens: {ids.shape[1:]}, {len(codes)} codes used, {-(p * np.log(p)).sum():.2f} nats per token"
  )
  for name, tokenizer in decoders.items():
    rebuilt = np.asarray(tokenizer.decode(ids))
    psnr = float(np.mean(losses.psnr(pictures, rebuilt, data_range=255.0)))  # mean over images
    tally = Tally()
    for scene, image in zip(scenes, rebuilt):
      tally.add(shapes.judge(image, scene.caption), scene.caption, scene.objects[0].side)
    print(f"{name}: PSNR {psnr:.2f} dB")
    print(tally.line(f"{name} reconstructions"))
  if args.skip_inpainting:
    return
  inpainted = Tally()
  for n, (scene, image) in enumerate(zip(scenes, pictures)):
    (obj,) = scene.objects
    mask = evaluate.object_box_mask(obj, config.image_size)
    result = pipeline.inpaint(image, mask, scene.caption, seed=n)[0]
    inpainted.add(shapes.judge(result, scene.caption), scene.caption, obj.side)
  print(inpainted.line("base, given the object's box"))


if __name__ == "__main__":
  main()
