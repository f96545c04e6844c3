"""Pre-encodes a data source: token ids per VQ tokenizer + text embeddings, to ArrayRecord shards.

Runs the frozen image tokenizer(s) and text encoder over a source once, so that the
transformer trainer reads ids and embeddings instead of decoding images (paper §2.3, §2.4;
open-muse measured ~30% less step time). The source is any data config of muse_jax.data
(--data.*). Each tokenizer is `[NAME@]RESOLUTION=PATH` (a `train-vq` workdir or a diffusers
VQModel / aMUSEd folder) and writes the feature "ids_NAME" (NAME defaults to the
resolution). Resumable: finished shards are skipped, so rerun the same command after an
interruption. On several hosts, run it on each; every host encodes its own part.

  muse-jax preencode --out=gs://BUCKET/cc3m_encoded \
      --data.source=tar --data.tar.paths='gs://BUCKET/cc3m/{00000..00331}.tar' \
      --tokenizer=256=gs://BUCKET/vq_f16 --tokenizer=512=gs://BUCKET/vq_f8 \
      --text_encoder=/models/t5-v1_1-xxl --text_length=128
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from muse_jax import partitioning
from muse_jax.data import pipeline, preencode, sources

_DATA = config_flags.DEFINE_config_dict(
  "data", pipeline.default_data_config(), "The source (muse_jax.data config)."
)
_OUT = flags.DEFINE_string("out", None, "Output folder (local or gs://).")
_TOKENIZERS = flags.DEFINE_multi_string(
  "tokenizer",
  [],
  "[NAME@]RESOLUTION=PATH of a VQ tokenizer; repeat for several (e.g. 256=... 512=...).",
)
_TEXT_ENCODER = flags.DEFINE_string(
  "text_encoder", None, "Hugging Face T5 or CLIP text-encoder folder."
)
_TEXT_LENGTH = flags.DEFINE_integer(
  "text_length", 0, "Tokens per caption, T (0 = the tokenizer's maximum)."
)
_TEXT_DTYPE = flags.DEFINE_enum(
  "text_dtype", "bfloat16", ["bfloat16", "float32"], "Text encoder compute dtype."
)
_BATCH = flags.DEFINE_integer(
  "batch_size", 64, "Examples per encoder call (a multiple of the local devices)."
)
_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 4096, "Source examples per output shard.")
_THREADS = flags.DEFINE_integer("num_threads", 16, "Read / decode threads.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _OUT.value or not _TOKENIZERS.value or not _TEXT_ENCODER.value:
    raise app.UsageError("--out, at least one --tokenizer and --text_encoder are required")
  try:
    specs = [preencode.parse_tokenizer(s) for s in _TOKENIZERS.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if len({name for name, _, _ in specs}) != len(specs):
    raise app.UsageError(f"two tokenizers share a name: {specs}; name them NAME@RESOLUTION=PATH")
  mesh = partitioning.make_mesh(devices=jax.local_devices())
  if _BATCH.value % mesh.size:
    raise app.UsageError(
      f"--batch_size={_BATCH.value} is not a multiple of the {mesh.size} local devices"
    )
  data = _DATA.value
  if data.source in ("preencoded", "shapes"):
    raise app.UsageError(
      f"--data.source={data.source!r} cannot be pre-encoded; use folder, tar or tfds"
    )
  try:
    source = sources.make_source(
      data, process_index=jax.process_index(), process_count=jax.process_count()
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  tokenizers = [preencode.image_tokenizer(name, res, path, mesh) for name, res, path in specs]
  totals = preencode.preencode(
    source,
    _OUT.value,
    tokenizers=tokenizers,
    encode_text=preencode.text_encoder(
      _TEXT_ENCODER.value, _TEXT_LENGTH.value, _TEXT_DTYPE.value, mesh
    ),
    batch_size=_BATCH.value,
    examples_per_shard=_PER_SHARD.value,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    min_image_fraction=data.min_image_fraction,
    num_threads=_THREADS.value,
    text_length=_TEXT_LENGTH.value,
    description=repr(source),
  )
  print(f"muse-jax preencode: {totals}")
