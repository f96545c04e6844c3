r"""Convert published weights into a run folder that `muse-jax sample` and `MusePipeline` load.

Kinds: `amused` (the aMUSEd diffusers folder: transformer/, vqvae/, text_encoder/,
tokenizer/, scheduler/; no torch needed). The run folder holds the U-ViT as an orbax
checkpoint, the VQ and CLIP folders as published, and a pipeline.json with aMUSEd's
sampler (12 steps, guidance 10, temperature 2 -> 0, cosine). Writing is atomic, and a
destination already holding the same conversion is left as it is.

  huggingface-cli download amused/amused-256 --local-dir /models/amused-256
  muse-jax convert amused --src /models/amused-256 --dst /runs/amused-256
  muse-jax sample --checkpoint /runs/amused-256 --prompt "a cowboy astronaut"
"""

from absl import app, flags

KINDS = ("amused",)

_SRC = flags.DEFINE_string("src", None, "The published folder to convert.")
_DST = flags.DEFINE_string("dst", None, "The run folder to write.")
_VARIANT = flags.DEFINE_string(
  "variant", None, "Weights variant to read, e.g. fp16 for *.fp16.safetensors (default: plain)."
)
_PARAM_DTYPE = flags.DEFINE_enum(
  "param_dtype", "float32", ["float32", "bfloat16"], "Storage dtype of the converted U-ViT."
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16"],
  "Computation dtype of the U-ViT when sampling: bfloat16 multiplies in bfloat16 and sums in "
  "float32 (the TPU's matmul; ~1.7x faster on AVX512-BF16 CPUs).",
)
_FORCE = flags.DEFINE_bool("force", False, "Convert even if --dst already holds this conversion.")


def main(argv: list[str]) -> None:
  kinds = argv[1:]
  if len(kinds) != 1 or kinds[0] not in KINDS:
    raise app.UsageError(f"name one kind to convert, one of {list(KINDS)}; got {kinds}")
  if not _SRC.value or not _DST.value:
    raise app.UsageError("--src and --dst are both required")
  from muse_jax.convert.amused import ConversionError, convert_amused

  print(f"converting {_SRC.value} into {_DST.value} ...", flush=True)  # ~a minute at full size
  try:
    done = convert_amused(
      _SRC.value,
      _DST.value,
      variant=_VARIANT.value,
      param_dtype=_PARAM_DTYPE.value,
      dtype=_DTYPE.value,
      force=_FORCE.value,
    )
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f"muse-jax convert: {e}") from None
  if done.up_to_date:
    print(f"{done.dst} already holds this conversion (--force to redo it)")
  else:
    print(f"converted {_SRC.value} into {done.dst}")
