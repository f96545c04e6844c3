"""Flags and helpers shared by the commands that sample a run: sample, inpaint, outpaint, edit.

A command adopts these flags with ``flags.adopt_module_key_flags(common)``, so its
``--help`` lists them beside its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import pathlib
import sys

from absl import flags
import numpy as np
from PIL import Image
import tqdm

CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  None,
  "Run folder: a pipeline.json (or tokenizer/, text_encoder/, base/ ...), e.g. a demo workdir.",
)
PROMPT = flags.DEFINE_multi_string(
  "prompt", [], "Text prompt; repeat the flag for several prompts."
)
NEGATIVE_PROMPT = flags.DEFINE_multi_string(
  "negative-prompt",
  [],
  "What to steer away from (guidance's unconditional side); one, or one per prompt.",
)
NUM_IMAGES = flags.DEFINE_integer(
  "num-images",
  1,
  "Images per prompt (sample) or variations of the result (inpaint, outpaint, edit).",
)
IMAGE = flags.DEFINE_string(
  "image", None, "Input image for inpaint / outpaint / edit (any format Pillow reads)."
)
SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed and flags give the same images.")
OUT = flags.DEFINE_string(
  "out", None, "Output PNG: a grid of the results with the prompt under each image."
)
SAVE_EACH = flags.DEFINE_bool("save-each", False, "Also write each image as OUT-<i>.png.")
NUM_STEPS = flags.DEFINE_integer(
  "num-steps", None, "Decoding steps of the base stage (default: the run's, 24)."
)
SUPERRES_STEPS = flags.DEFINE_integer(
  "superres-num-steps", None, "Decoding steps of the super-res stage (default 8)."
)
GUIDANCE = flags.DEFINE_float(
  "guidance-scale",
  None,
  "Classifier-free guidance t in (1+t)·cond − t·uncond (default: the run's); 0 = conditional only.",
)
GUIDANCE_SCHEDULE = flags.DEFINE_enum(
  "guidance-schedule",
  None,
  ["linear", "constant"],
  "Guidance over the steps: ramp from 0 (paper) or constant.",
)
TEMPERATURE = flags.DEFINE_float("temperature", None, "Token sampling temperature (0 = argmax).")
CHOICE_TEMPERATURE = flags.DEFINE_float(
  "choice-temperature", None, "Confidence noise τ₀, annealed linearly to 0 over the steps."
)
TOP_K = flags.DEFINE_integer("top-k", None, "Sample among the k likeliest tokens only.")
SCHEDULE = flags.DEFINE_enum(
  "schedule",
  None,
  ["cosine", "linear", "square", "cubic", "sqrt", "exp"],
  "Mask schedule of the decode loop.",
)


class CommandError(Exception):
  """A user-caused error, printed as one line."""


def fail(command: str, error: BaseException) -> None:
  """Exits with one line naming the command and the problem."""
  sys.exit(f"muse-jax {command}: {error}")


def require(flag: flags.FlagHolder, what: str) -> None:
  if flag.value in (None, "", []):
    raise CommandError(f"--{flag.name} is required ({what})")


def sampler_overrides() -> dict:
  """The sampler flags that were given, as ``SamplerOptions`` fields."""
  values = dict(
    num_steps=NUM_STEPS.value,
    schedule=SCHEDULE.value,
    temperature=TEMPERATURE.value,
    choice_temperature=CHOICE_TEMPERATURE.value,
    top_k=TOP_K.value,
    guidance_schedule=GUIDANCE_SCHEDULE.value,
  )
  if GUIDANCE.value is not None:
    if GUIDANCE.value < 0:
      raise CommandError(f"--guidance-scale must be >= 0; got {GUIDANCE.value}")
    values["guidance_scale"] = GUIDANCE.value
  if NUM_STEPS.value is not None and NUM_STEPS.value < 1:
    raise CommandError(f"--num-steps must be >= 1; got {NUM_STEPS.value}")
  return {k: v for k, v in values.items() if v is not None}


def negative_prompts(num_prompts: int) -> list[str] | str | None:
  negatives = NEGATIVE_PROMPT.value
  if not negatives:
    return None
  if len(negatives) == 1:
    return negatives[0]
  if len(negatives) != num_prompts:
    raise CommandError(
      f"got {len(negatives)} --negative-prompt flags for {num_prompts} --prompt flags"
    )
  return negatives


@contextlib.contextmanager
def phases(total: int) -> Iterator[tqdm.tqdm]:
  """A progress bar over a command's phases (loading, compiling + sampling, writing)."""
  with tqdm.tqdm(
    total=total, unit="phase", bar_format="{desc:<32}{bar}| {n_fmt}/{total_fmt} [{elapsed}]"
  ) as bar:
    yield bar


def load_run(bar: tqdm.tqdm):
  """Loads the pipeline named by --checkpoint."""
  from muse_jax import runs

  require(CHECKPOINT, "a run folder")
  bar.set_description("loading the pipeline")
  pipeline = runs.load_pipeline(CHECKPOINT.value)
  bar.update()
  return pipeline


def read_image(path: str, size: int | None, *, mask: bool = False) -> np.ndarray:
  """An RGB image (or an L mask, True where white) center-cropped and resized to ``size``
  (``None``: as it is, to check it early)."""
  from muse_jax import images

  p = pathlib.Path(path)
  if not p.is_file():
    raise CommandError(f"no image at {p}")
  try:
    with Image.open(p) as im:
      im.load()
      im = im.convert("L" if mask else "RGB")
  except OSError as e:
    raise CommandError(f"{p} is not a readable image ({e})") from None
  cropped = np.asarray(im if size is None else images.center_crop(im, size))
  return cropped > 127 if mask else cropped


def write_results(pictures: np.ndarray, captions: list[str], bar: tqdm.tqdm) -> pathlib.Path:
  """Writes the captioned grid to --out (and each image with --save-each)."""
  from muse_jax import images

  bar.set_description("writing")
  out = pathlib.Path(OUT.value)
  images.save_png(images.make_grid(list(pictures), captions), out)
  if SAVE_EACH.value:
    for i, picture in enumerate(pictures):
      images.save_png(picture, out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}"))
  bar.update()
  return out


def run(
  command: str,
  make: Callable[..., tuple[np.ndarray, list[str]]],
  check: Callable[[], None] | None = None,
) -> None:
  """Checks the flags, loads the run, calls ``make(pipeline)`` -> (uint8 images, captions)
  and writes --out.

  Any error a user can cause (missing run parts, unreadable images, bad flag values)
  ends the command with one line naming it; flag errors come before the slow loading.
  """
  try:
    require(OUT, "the output PNG")
    require(CHECKPOINT, "a run folder")
    sampler_overrides()
    if check is not None:
      check()
    with phases(3) as bar:
      pipeline = load_run(bar)
      bar.set_description("compiling + sampling")
      pictures, captions = make(pipeline)
      bar.update()
      out = write_results(pictures, captions, bar)
  except (CommandError, FileNotFoundError, ValueError, TypeError) as e:
    fail(command, e)
  print(f"wrote {len(pictures)} image(s) of {pictures.shape[1]}x{pictures.shape[2]} to {out}")


def single_prompt() -> str:
  require(PROMPT, "the text for the edit")
  if len(PROMPT.value) != 1:
    raise CommandError(f"this command takes one --prompt; got {len(PROMPT.value)}")
  return PROMPT.value[0]
