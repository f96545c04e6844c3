"""The demo's evaluation: generate for prompts of every caption form, judge every image.

Prompts cover every (colour, shape) pair in the single-object form and a sample of the
count and relation forms, each form with prompts that mention a held-out pair (never
seen in training). The shapes set's judge decides from pixels whether each image shows
its prompt; an inpainting example replaces an object by the one a prompt asks for.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Any

import ml_collections
import numpy as np
import tqdm

from muse_jax import images
from muse_jax.data import shapes
from muse_jax.demo.build import shapes_source
from muse_jax.pipeline import MusePipeline

MAX_IMAGES_PER_CALL = 32


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  form: str  # "single", "count" or "relation"
  held_out: bool  # mentions a (colour, shape) pair never seen in training


def prompts(config: ml_collections.ConfigDict) -> list[Prompt]:
  """Every single-object prompt, and samples of the count and relation forms."""
  held = shapes.parse_pairs(config.held_out)
  pairs = [(c, s) for c in shapes.PALETTE for s in shapes.SHAPES]
  seen = [p for p in pairs if p not in held]
  rng = np.random.default_rng(config.seed)
  out = [Prompt(shapes.caption_single(c, s), "single", (c, s) in held) for c, s in pairs]

  def pick(options):
    return options[rng.integers(len(options))]

  count_pairs = [pick(seen) for _ in range(config.count_prompts)] + sorted(held)
  for c, s in count_pairs:
    n = int(rng.integers(2, 5))
    out.append(Prompt(shapes.caption_count(n, c, s), "count", (c, s) in held))
  firsts = [pick(seen) for _ in range(config.relation_prompts)] + sorted(held)
  for a in firsts:
    b = pick([p for p in seen if p != a])
    out.append(Prompt(shapes.caption_relation(a, pick(shapes.RELATIONS), b), "relation", a in held))
  return out


def generate(
  pipeline: MusePipeline, texts: list[str], n: int, seed: int, **options: Any
) -> np.ndarray:
  """n images per prompt, in calls of at most MAX_IMAGES_PER_CALL images; ``options``
  override the run's sampler settings (``MusePipeline.generate``'s keyword arguments)."""
  per_call = max(1, MAX_IMAGES_PER_CALL // n)
  chunks = [texts[i : i + per_call] for i in range(0, len(texts), per_call)]
  pictures = []
  with tqdm.tqdm(total=len(texts) * n, desc="generate", unit="img") as bar:
    for i, chunk in enumerate(chunks):
      pictures.append(pipeline.generate(chunk, seed=seed + i, num_images_per_prompt=n, **options))
      bar.update(len(pictures[-1]))
  return np.concatenate(pictures)


def object_box_mask(obj: shapes.ShapeObject, size: int) -> np.ndarray:
  """bool [size, size]: the object's bounding box, grown by 1/16 of the canvas (>= 2 px)."""
  margin = max(2, size // 16)
  half = obj.side * size / 2  # ShapeObject positions are fractions of the canvas
  x0, y0 = int(obj.cx * size - half) - margin, int(obj.cy * size - half) - margin
  x1 = int(np.ceil(obj.cx * size + half)) + margin
  y1 = int(np.ceil(obj.cy * size + half)) + margin
  mask = np.zeros((size, size), bool)
  mask[max(0, y0) : y1, max(0, x0) : x1] = True
  return mask


def inpainting_example(
  pipeline: MusePipeline, config: ml_collections.ConfigDict, seed: int
) -> dict:
  """Replaces the object of a "a blue square" image by "a red circle"."""
  source = shapes_source(config, split="all")
  index = next(i for i in range(10_000) if source.scene(i).caption == "a blue square")
  scene, image = source.scene(index), source[index]["image"]
  (obj,) = scene.objects
  mask = object_box_mask(obj, config.image_size)
  prompt = "a red circle"
  result = pipeline.inpaint(image, mask, prompt, seed=seed)[0]
  return dict(
    image=image, mask=mask, result=result, prompt=prompt, verdict=shapes.judge(result, prompt)
  )


def evaluate(
  pipeline: MusePipeline, config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> dict:
  """Generates, judges, and writes samples/, samples.png and returns the report."""
  todo = prompts(config)
  n = config.images_per_prompt
  pictures = generate(pipeline, [p.text for p in todo], n, config.seed)
  entries, tiles, captions = [], [], []
  (workdir / "samples").mkdir(exist_ok=True)
  for i, picture in enumerate(pictures):
    p = todo[i // n]
    verdict = shapes.judge(picture, p.text)
    file = f"samples/{i:03d}.png"
    images.save_png(picture, workdir / file)
    entries.append(dict(prompt=p.text, form=p.form, held_out=p.held_out, image=file, correct=bool(verdict),
                        reason="" if verdict else verdict.reason))  # fmt: skip
    tiles.append(picture)
    captions.append(f"{'OK' if verdict else 'NO'} {p.text}{' (held out)' if p.held_out else ''}")

  inpaint = inpainting_example(pipeline, config, config.seed)
  shown_mask = np.where(inpaint["mask"][..., None], np.uint8(128), inpaint["image"])
  tiles += [inpaint["image"], shown_mask, inpaint["result"]]
  captions += [
    "inpaint: input",
    "masked region",
    f"{'OK' if inpaint['verdict'] else 'NO'} -> {inpaint['prompt']}",
  ]
  for name, picture in (("inpaint_input", inpaint["image"]), ("inpaint_result", inpaint["result"])):
    images.save_png(picture, workdir / "samples" / f"{name}.png")
  big = [np.kron(t, np.ones((2, 2, 1), np.uint8)) for t in tiles]  # 2x: room for the captions
  images.save_png(images.make_grid(big, captions, columns=max(8, 2 * n)), workdir / "samples.png")

  totals = collections.defaultdict(lambda: {"seen": [0, 0], "held_out": [0, 0]})
  # Single-object prompts on seen pairs by shape: where the demo falls short (squares).
  by_shape = {shape: [0, 0] for shape in shapes.SHAPES}
  for e in entries:
    t = totals[e["form"]]["held_out" if e["held_out"] else "seen"]
    t[0] += e["correct"]
    t[1] += 1
    if e["form"] == "single" and not e["held_out"]:
      t = by_shape[shapes.parse_caption(e["prompt"]).pairs[0][1]]
      t[0] += e["correct"]
      t[1] += 1
  tally = lambda c, t: dict(correct=c, total=t, accuracy=c / t if t else None)
  return dict(
    images=entries,
    totals={form: {k: tally(*ct) for k, ct in split.items()} for form, split in totals.items()},
    single_seen_by_shape={shape: tally(*ct) for shape, ct in by_shape.items()},
    inpainting=dict(
      prompt=inpaint["prompt"],
      input="samples/inpaint_input.png",
      image="samples/inpaint_result.png",
      correct=bool(inpaint["verdict"]),
      reason="" if inpaint["verdict"] else inpaint["verdict"].reason,
    ),
  )
