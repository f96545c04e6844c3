"""Tokenizer quality on real photos, trained on this CPU in minutes.

Trains a small f=8 VQGAN (the real trainer: ``muse_jax.trainers.vqgan``) on random
64x64 crops (with flips) of the left 80% of scikit-image's bundled photographs, within a
wall-time budget (set-up and compilation included), then reports, for the EMA params:

* PSNR (uint8, dB) on held-out crops of two kinds: from the right 20% of the training
  photographs (regions never seen), and from three photographs never seen at all;
* codebook usage: the fraction of the K codes those crops use, and that a large set of
  training crops uses, plus the perplexity of the code distribution.

``--variant`` picks the codebook recipe, to show what keeps usage high:
  ``restart``  k-means init on the first batch + dead-code restarts (default)
  ``l2``       l2-normalised 8-dim codes (ViT-VQGAN) + restarts
  ``plain``    random init, no restarts (the usual VQGAN; codes die)

  python benchmarks/vq_quality.py --minutes 15 --out /tmp/vq_quality
  python benchmarks/vq_quality.py --minutes 3 --variant plain --out /tmp/vq_plain

Writes OUT/result.json and OUT/heldout.png (rows: unseen-photo crops, their
reconstructions, unseen-region crops, their reconstructions).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings

import numpy as np

TRAIN_PHOTOS = (
    "astronaut", "brick", "chelsea", "clock", "coins", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "stereo_motorcycle", "cell", "page", "text",
)  # fmt: skip
HELDOUT_PHOTOS = ("coffee", "rocket", "camera")


def photos(names: tuple[str, ...]) -> dict[str, np.ndarray]:
  """uint8 RGB [H, W, 3] photographs from skimage.data (grey ones replicated to RGB)."""
  import skimage.data

  out = {}
  for name in names:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      im = getattr(skimage.data, name)()
    if isinstance(im, tuple):
      im = im[0]
    im = np.asarray(im)
    if im.ndim == 2:
      im = np.repeat(im[..., None], 3, axis=-1)
    out[name] = np.ascontiguousarray(im[..., :3].astype(np.uint8))
  return out


class CropIterator:
  """Random square crops with horizontal flips; batch n is a pure function of (seed, n)."""

  def __init__(self, images: list[np.ndarray], size: int, batch: int, seed: int = 0):
    self.images, self.size, self.batch, self.seed, self.n = images, size, batch, seed, 0
    # Sample photos by area, so that large ones are not under-represented.
    areas = np.array([im.shape[0] * im.shape[1] for im in images], np.float64)
    self.p = areas / areas.sum()

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.n])
    self.n += 1
    return {"image": np.stack([self._crop(rng) for _ in range(self.batch)])}

  def _crop(self, rng: np.random.Generator) -> np.ndarray:
    im = self.images[rng.choice(len(self.images), p=self.p)]
    y = rng.integers(0, im.shape[0] - self.size + 1)
    x = rng.integers(0, im.shape[1] - self.size + 1)
    crop = im[y : y + self.size, x : x + self.size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop

  def get_state(self) -> dict:
    return {"n": self.n}

  def set_state(self, state: dict) -> None:
    self.n = int(state["n"])


def grid_crops(images: list[np.ndarray], size: int, per_image: int, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = []
  for im in images:
    for _ in range(per_image):
      y = rng.integers(0, im.shape[0] - size + 1)
      x = rng.integers(0, im.shape[1] - size + 1)
      out.append(im[y : y + size, x : x + size])
  return np.stack(out)


def make_config(
  variant: str, steps: int, batch: int, size: int, minutes: float, codebook_size: int = 512
):
  from muse_jax.trainers.vqgan_config import base_config

  c = base_config()
  c.model.update(
    channels=(32, 64, 64, 128),
    num_res_blocks=1,
    latent_channels=64,
    codebook_size=codebook_size,
    norm_groups=16,
  )
  c.disc.update(channels=(32, 64, 128, 128), stem_channels=16)
  c.data.resolution = size
  c.loss.update(
    perceptual_weight=0.0, disc_start=int(steps * 0.6), r1_every=16, adversarial_weight=0.1
  )
  c.codebook.update(init="kmeans", restart_every=25, dead_fraction=0.1, usage_decay=0.98)
  if variant == "l2":
    c.model.update(l2_normalize=True, embed_dim=8, use_quant_conv=True)
  elif variant == "plain":
    c.codebook.update(init="random", restart_every=0)
  elif variant != "restart":
    raise ValueError(f"unknown variant {variant!r}; expected restart, l2 or plain")
  c.train.update(
      steps=steps, batch_size=batch, ema_decay=0.99, log_every=50, image_every=0, eval_every=200,
      eval_batch=32, ckpt_every=1000, keep=1, async_checkpoints=False, time_limit_s=minutes * 60,
  )  # fmt: skip
  c.optim.update(lr=4e-4, warmup_steps=100, weight_decay=1e-4)
  c.disc_optim.update(lr=4e-4, warmup_steps=100, weight_decay=1e-4)
  return c


def evaluate(workdir: pathlib.Path, held: np.ndarray, train_crops: np.ndarray) -> dict:
  from muse_jax.vq_tokenizer import load_tokenizer

  tok = load_tokenizer(workdir)
  k = tok.model.codebook_size

  def run(x):
    ids, rec = [], []
    for i in range(0, len(x), 64):
      j = np.asarray(tok.encode(x[i : i + 64]))
      ids.append(j)
      rec.append(tok.decode(j))
    return np.concatenate(ids), np.concatenate(rec)

  ids_h, rec_h = run(held)
  ids_t, _ = run(train_crops)
  mse = np.mean((held.astype(np.float64) - rec_h.astype(np.float64)) ** 2, axis=(1, 2, 3))
  psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))

  def usage(ids):
    counts = np.bincount(ids.reshape(-1), minlength=k)
    p = counts / counts.sum()
    nz = p[p > 0]
    return float((counts > 0).mean()), float(np.exp(-(nz * np.log(nz)).sum()))

  uh, ph = usage(ids_h)
  ut, pt = usage(ids_t)
  return {
    "heldout_psnr_db": float(psnr.mean()),
    "heldout_crops": len(held),
    "heldout_codebook_usage": uh,
    "heldout_perplexity": ph,
    "train_crops": len(train_crops),
    "train_codebook_usage": ut,
    "train_perplexity": pt,
    "codebook_size": k,
    "reconstructions": rec_h,
  }


def main() -> None:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--minutes", type=float, default=15.0, help="wall-time budget of training, compile included"
  )
  ap.add_argument("--variant", default="restart", choices=("restart", "l2", "plain"))
  ap.add_argument(
    "--steps", type=int, default=0, help="schedule length (0: estimated from the budget)"
  )
  ap.add_argument("--step_seconds", type=float, default=1.0, help="assumed s/step for the estimate")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--codebook_size", type=int, default=512)
  ap.add_argument("--out", default="/tmp/vq_quality")
  ap.add_argument(
    "--eval_only", action="store_true", help="evaluate OUT/run as it is, without training"
  )
  args = ap.parse_args()

  from absl import logging

  logging.set_verbosity(logging.INFO)
  from muse_jax import images as images_lib
  from muse_jax.trainers import vqgan

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  full = list(photos(TRAIN_PHOTOS).values())
  cut = [int(im.shape[1] * 0.8) for im in full]
  train = [im[:, :c] for im, c in zip(full, cut, strict=True)]
  regions = [im[:, c:] for im, c in zip(full, cut, strict=True)]
  held_regions = grid_crops(regions, args.size, per_image=16, seed=3)
  held = grid_crops(list(photos(HELDOUT_PHOTOS).values()), args.size, per_image=64, seed=1)
  train_eval = grid_crops(train, args.size, per_image=32, seed=2)
  steps = args.steps or int(args.minutes * 60 / args.step_seconds)
  config = make_config(args.variant, steps, args.batch, args.size, args.minutes, args.codebook_size)
  t0 = time.time()
  if args.eval_only:
    steps_done, seconds = None, None
  else:
    state = vqgan.train_and_evaluate(
      config,
      out / "run",
      data=CropIterator(train, args.size, args.batch),
      eval_images=held[:: len(held) // 32],
    )
    steps_done, seconds = int(state.step), round(time.time() - t0, 1)
  r = evaluate(out / "run", held, train_eval)
  rr = evaluate(out / "run", held_regions, train_eval[:1])
  r.update(
    heldout_region_psnr_db=rr["heldout_psnr_db"],
    heldout_region_crops=rr["heldout_crops"],
    heldout_region_codebook_usage=rr["heldout_codebook_usage"],
  )
  pick_h = np.linspace(0, len(held) - 1, 8).astype(int)
  pick_r = np.linspace(0, len(held_regions) - 1, 8).astype(int)
  rows = [
    held[pick_h],
    r.pop("reconstructions")[pick_h],
    held_regions[pick_r],
    rr["reconstructions"][pick_r],
  ]
  grid = images_lib.make_grid([im for row in rows for im in row], columns=8)
  images_lib.save_png(grid, out / "heldout.png")
  r.update(
    variant=args.variant,
    steps_done=steps_done,
    steps_scheduled=steps,
    train_seconds=seconds,
    batch=args.batch,
    crop=args.size,
    tokens_per_crop=(args.size // 8) ** 2,
    train_photos=list(TRAIN_PHOTOS),
    heldout_photos=list(HELDOUT_PHOTOS),
  )
  (out / "result.json").write_text(json.dumps(r, indent=2))
  print(json.dumps(r, indent=2))


if __name__ == "__main__":
  main()
