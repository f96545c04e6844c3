"""The data config: every knob of sources, decoding and the pipeline, in one ConfigDict.

Trainer configs embed `default_data_config()` as `config.data` and override fields from
the command line (`--config.data.source=tar --config.data.tar.paths=...`).
"""

import ml_collections
from ml_collections import config_dict


def default_data_config() -> ml_collections.ConfigDict:
  """Every data knob; trainer configs embed it as `config.data` and override fields."""
  c = ml_collections.ConfigDict()
  c.source = "shapes"  # "folder", "tar", "tfds", "preencoded" or "shapes"
  c.folder = dict(
    path="",  # folder of images (local or gs://)
    captions="",  # captions .jsonl / .csv ("" = captions.jsonl|csv in the folder, else sidecar .txt)
  )
  c.tar = dict(
    paths="",  # comma-separated globs / {000..999} ranges of .tar shards
    index_dir="",  # cache of shard indices ("" = rebuild at every start)
    image_extensions=("jpg", "jpeg", "png", "webp"),  # in order of preference
    caption_extensions=("txt", "json"),
  )
  c.tfds = dict(
    name="",  # e.g. "coco_captions", prepared in array_record format
    data_dir="",  # "" = TFDS's default
    builder_dir="",  # or the prepared folder itself, instead of name
    split="train",
    image_feature="image",
    caption_feature="caption",  # e.g. "captions/text" for coco_captions
  )
  c.preencoded = dict(
    path="",  # output folder of `muse-jax preencode`
    features=(),  # ids features to read, e.g. ("ids_256",); () = all
    text_length=0,  # T to pad / cut text to (0 = the length recorded at pre-encoding)
  )
  c.shapes = dict(
    size=0,  # canvas side (0 = resolution)
    seed=0,
    split="train",  # "train", "heldout" or "all"
    forms=dict(single=1.0, count=1.0, relation=1.0),  # caption forms and weights
    shape_weights=dict(circle=1.0, square=1.0, triangle=1.0),  # how often each shape is drawn
    held_out=(),  # "colour shape" pairs never drawn in train, e.g. ("purple triangle",)
  )
  c.resolution = 256  # side of the square crop
  c.crop = "random"  # "random" (training) or "center"
  c.min_image_fraction = 0.5  # shorter sides below this x resolution are skipped, others upscaled
  c.max_image_pixels = 178_956_970  # larger images are skipped (decompression bombs)
  c.output = "float32"  # "float32" in [-1, 1] or "uint8" (4x less host memory and transfer)
  c.allow_empty_captions = False
  c.seed = 0  # shuffle and crop seed (make_iterator's seed argument overrides it)
  c.shuffle = True
  c.num_epochs = config_dict.placeholder(int)  # None = repeat forever
  c.drop_remainder = True  # the last, smaller batch of a finite run is dropped
  c.num_workers = 0  # worker processes (0 = decode in this process's threads)
  c.worker_buffer_size = 2  # batches buffered per worker
  c.num_threads = 16  # read / decode threads per process
  c.prefetch_buffer_size = 256  # examples read ahead per process
  c.read_retries = 3  # I/O retries before an example is skipped as unreadable
  return c


_PATH_FIELDS = {
  "folder": "folder.path",
  "tar": "tar.paths",
  "tfds": "tfds.name",
  "preencoded": "preencoded.path",
}


def expand_short_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A full data config from a full one (copied) or the short form trainers may embed.

  The short form is {source, path, image_size, seed, num_workers} (any subset): `path`
  goes to the source kind's own field (folder.path, tar.paths, tfds.name, preencoded.path)
  and `image_size` to `resolution`.
  """
  if "resolution" in config:
    return config.copy_and_resolve_references()
  full = default_data_config()
  unknown = set(config.keys()) - {"source", "path", "image_size", "seed", "num_workers"}
  if unknown:
    raise ValueError(
      f"data config keys {sorted(unknown)} are neither a full data config (default_data_config) "
      "nor its short form {source, path, image_size, seed, num_workers}"
    )
  full.source = config.get("source", full.source)
  full.resolution = config.get("image_size", full.resolution)
  full.seed = config.get("seed", full.seed)
  full.num_workers = config.get("num_workers", full.num_workers)
  if config.get("path") and full.source in _PATH_FIELDS:
    section, field = _PATH_FIELDS[full.source].split(".")
    full[section][field] = config.path
  return full
