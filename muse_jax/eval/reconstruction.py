"""Reconstruction quality of an image tokenizer: PSNR and codebook usage over a folder."""

import pathlib

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def reconstruct_folder(
  checkpoint: str, images: str, out: str, size: int = 0, batch_size: int = 8
) -> dict:
  """Reconstructs every image of a folder; returns {"psnr", "codebook_usage", "files"}."""
  from muse_jax import images as images_lib
  from muse_jax.vq_tokenizer import load_tokenizer

  folder = pathlib.Path(images)
  if not folder.is_dir():
    raise FileNotFoundError(f"no folder of images at {images}")
  files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images}")
  tok = load_tokenizer(checkpoint)
  f = tok.model.downsample_factor
  size = size or 16 * f
  if size % f:
    raise ValueError(f"--size {size} is not a multiple of the tokenizer's downsampling factor {f}")
  out_dir = pathlib.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  psnrs, ids_all = [], []
  for i in range(0, len(files), batch_size):
    chunk = files[i : i + batch_size]
    x = np.stack([images_lib.load_rgb(p, size) for p in chunk])
    ids = np.asarray(tok.encode(x))
    rec = tok.decode(ids)
    ids_all.append(ids.reshape(-1))
    for p, a, b in zip(chunk, x, rec, strict=True):
      mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
      psnrs.append(10 * np.log10(255.0**2 / max(mse, 1e-10)))
      images_lib.save_png(b, out_dir / f"{p.stem}.png")
  used = np.unique(np.concatenate(ids_all)).size
  return {
    "psnr": float(np.mean(psnrs)),
    "codebook_usage": used / tok.model.codebook_size,
    "codes_used": int(used),
    "files": len(files),
  }
