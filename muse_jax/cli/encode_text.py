"""Pre-encodes captions with a frozen text encoder (T5 or CLIP) into bf16 shards.

Reads a Hugging Face text-encoder folder (config.json, safetensors, tokenizer) and a
captions file (one caption per line, or .jsonl with a "caption" field), and writes
`text-NNNNN.safetensors` shards (embeddings bf16 [n, T, D], mask bool [n, T], pooled bf16
[n, P] for CLIP) plus `index.json` under --out. Running it again with the same arguments
resumes after the last finished shard. Training then reads the folder with
`muse_jax.text_shards.EncodedCaptions` and never runs the encoder.

  muse-jax encode-text --text-encoder=/models/t5-v1_1-xxl --captions=captions.txt --out=/data/t5
  muse-jax encode-text --text-encoder=/models/amused-256 --captions=caps.jsonl --out=/data/clip \\
      --max-length=77 --fsdp=8
"""

from absl import app, flags
import jax
import jax.numpy as jnp

from muse_jax import partitioning, text_shards
from muse_jax.text import TextEncoder

_TEXT_ENCODER = flags.DEFINE_string(
  "text_encoder", None, "Hugging Face text-encoder folder (or a diffusers pipeline folder)."
)
_CAPTIONS = flags.DEFINE_string(
  "captions", None, "Captions: .txt (one per line) or .jsonl ('caption')."
)
_OUT = flags.DEFINE_string(
  "out", None, "Output folder for the shards and index.json (created if missing)."
)
_MAX_LENGTH = flags.DEFINE_integer(
  "max_length", None, "Tokens per caption (default: the tokenizer's maximum).", lower_bound=2
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.", lower_bound=1)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Captions per output file.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Encoder compute dtype.")
_HIDDEN_LAYER = flags.DEFINE_string(
  "hidden_layer",
  None,
  "CLIP: hidden_states index (default -2, aMUSEd's) or 'final'; T5: 'final' only.",
)
_FSDP = flags.DEFINE_integer(
  "fsdp", 1, "Devices that shard the parameters (mesh axis fsdp).", lower_bound=1
)
_TENSOR = flags.DEFINE_integer(
  "tensor", 1, "Devices that split heads and MLP (mesh axis tensor).", lower_bound=1
)
for _name in ("text_encoder", "max_length", "batch_size", "shard_size", "hidden_layer"):
  flags.DEFINE_alias(_name.replace("_", "-"), _name)  # --text-encoder as well as --text_encoder.


def _hidden_layer(value: str | None) -> int | str | None:
  if value in (None, "final"):
    return value
  try:
    return int(value)
  except ValueError:
    raise app.UsageError(f"--hidden_layer={value!r}; expected an integer or 'final'") from None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  missing = [f"--{f.name}" for f in (_TEXT_ENCODER, _CAPTIONS, _OUT) if not f.value]
  if missing:
    raise app.UsageError(
      f"{', '.join(missing)} required, e.g. --text-encoder=DIR --captions=FILE --out=DIR"
    )
  try:
    mesh = partitioning.make_mesh({"data": -1, "fsdp": _FSDP.value, "tensor": _TENSOR.value})
    encoder = TextEncoder.from_pretrained(
      _TEXT_ENCODER.value,
      max_length=_MAX_LENGTH.value,
      dtype=jnp.dtype(_DTYPE.value),
      mesh=mesh,
      hidden_layer=_hidden_layer(_HIDDEN_LAYER.value),
    )
    print(f"{encoder} on {jax.device_count()} devices, mesh {dict(mesh.shape)}")
    index = text_shards.encode_captions(
      encoder,
      _CAPTIONS.value,
      _OUT.value,
      batch_size=_BATCH_SIZE.value,
      shard_size=_SHARD_SIZE.value,
    )
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"muse-jax encode-text: {e}") from None
  print(f"wrote {index['num_captions']} captions in {len(index['shards'])} shards to {_OUT.value}")
