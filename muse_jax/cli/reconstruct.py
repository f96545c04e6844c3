"""Reconstruct images through a VQGAN tokenizer: writes the reconstructions, prints PSNR
and codebook usage.

CHECKPOINT is a train-vq workdir (EMA params), a diffusers VQModel folder or an aMUSEd
pipeline folder (its vqvae/). Images are center-cropped to --size (default: 16 tokens
per side, i.e. 16 x the tokenizer's downsampling factor).

  muse-jax reconstruct --checkpoint /tmp/vq_tiny --images photos/ --out /tmp/recon
"""

from absl import flags

from muse_jax.eval.reconstruction import reconstruct_folder

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "train-vq workdir or diffusers VQModel folder."
)
_IMAGES = flags.DEFINE_string("images", None, "Folder of images (png, jpg, webp, ...).")
_OUT = flags.DEFINE_string("out", None, "Folder for the reconstructions (created).")
_SIZE = flags.DEFINE_integer(
  "size", 0, "Side of the center crop in pixels (0: 16 x downsampling factor)."
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.mark_flags_as_required(["checkpoint", "images", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  try:
    r = reconstruct_folder(_CHECKPOINT.value, _IMAGES.value, _OUT.value, _SIZE.value, _BATCH.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"muse-jax reconstruct: {e}") from None
  print(f"{r['files']} images -> {_OUT.value}")
  print(f"PSNR {r['psnr']:.2f} dB (uint8, mean over images)")
  print(f"codebook usage {r['codebook_usage']:.3f} ({r['codes_used']} codes)")
