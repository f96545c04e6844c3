"""Random-access sources, and `make_source`, which builds this host's part of one from a config.

Every source follows grain's `RandomAccessDataSource` protocol (`len`, `[i]`) and returns
raw records (see `transforms.ImageTransform`): reading never raises for a bad example,
it returns the reason instead, so that the pipeline can skip and count it. Kinds:

- folder:     `folder.FolderSource`, images with sidecar .txt or a captions.jsonl / .csv
- tar:        `tar_shards.TarSource`, WebDataset-style shards, local or gs://
- tfds:       `TfdsSource`, a TFDS dataset prepared in array_record format (no TensorFlow)
- preencoded: `PreencodedSource`, shards written by `muse-jax preencode`
- shapes:     `shapes.ShapesSource`, the synthetic set
"""

import json
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from muse_jax.data import common, folder, shapes, tar_shards

SOURCE_KINDS = ("folder", "tar", "tfds", "preencoded", "shapes")
PREENCODED_METADATA = "metadata.json"
PREENCODED_SUFFIX = ".array_record"


def _nested_get(example: dict, path: str):
  value = example
  for part in path.split("/"):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


class TfdsSource:
  """A TFDS dataset prepared in array_record format, read without TensorFlow.

  Images are not decoded by TFDS (`SkipDecoding`): the pipeline decodes the bytes, so
  that a corrupt image is skipped and counted rather than raised.
  """

  def __init__(
    self,
    *,
    name: str = "",
    data_dir: str = "",
    builder_dir: str = "",
    split: str = "train",
    image_feature: str = "image",
    caption_feature: str = "caption",
  ):
    """Opens the dataset.

    Args:
      name: registered dataset name (e.g. "coco_captions"), found in `data_dir`.
      data_dir: TFDS data directory ("" = TFDS's default).
      builder_dir: instead of a name, the prepared folder itself (`.../name/config/version`).
      split: split spec, e.g. "train" or "train[:90%]".
      image_feature: path of the image feature, "/" for nesting (e.g. "image").
      caption_feature: path of the caption feature, e.g. "captions/text" (a list: one
        caption is drawn per example and epoch).
    """
    import tensorflow_datasets as tfds  # slow import, only for this source

    if bool(name) == bool(builder_dir):
      raise ValueError(
        f"tfds source needs exactly one of name or builder_dir; got {name=!r}, {builder_dir=!r}"
      )
    decoders: dict[str, Any] = {}
    node = decoders
    *parents, leaf = image_feature.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = tfds.decode.SkipDecoding()
    if builder_dir:
      builder = tfds.builder_from_directory(builder_dir)
      self._data = builder.as_data_source(split=split, decoders=decoders)
    else:
      self._data = tfds.data_source(
        name, split=split, data_dir=data_dir or None, decoders=decoders, download=False
      )
    self.description = f"tfds {name or builder_dir} [{split}]"
    self.image_feature, self.caption_feature = image_feature, caption_feature

  def __repr__(self) -> str:
    return f"TfdsSource({self.description}, n={len(self)})"

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    key = f"{self.description}/{index}"
    try:
      example = self._data[int(index)]
    except Exception:  # a damaged record must not stop the job
      return {"key": key, "error": "read_error"}
    return {
      "key": key,
      "image": _nested_get(example, self.image_feature),
      "caption": _nested_get(example, self.caption_feature),
    }


def read_preencoded_metadata(path: str) -> dict:
  """The metadata.json of a pre-encoded folder."""
  file = epath.Path(path) / PREENCODED_METADATA
  if not file.exists():
    raise ValueError(
      f"{str(path)!r} holds no {PREENCODED_METADATA}: is it a `muse-jax preencode` output?"
    )
  return json.loads(file.read_text())


class PreencodedSource:
  """The ArrayRecord shards of `muse-jax preencode`: one packed record per example."""

  def __init__(self, path: str):
    import grain

    self.path = str(path)
    self.metadata = read_preencoded_metadata(path)
    root = epath.Path(path)
    shards = sorted(str(p) for p in root.glob(f"shard-*{PREENCODED_SUFFIX}"))
    if not shards:
      raise ValueError(f"{self.path!r} holds no finished shard (shard-*{PREENCODED_SUFFIX})")
    hosts = self.metadata.get("process_count", 1)
    finished = len(list(root.glob(f"host-*-of-{hosts:03d}.json")))
    if finished < hosts:
      logging.warning(
        "pre-encoding of %s is unfinished: %d of %d hosts are done; reading its %d finished shards",
        self.path,
        finished,
        hosts,
        len(shards),
      )
    self.shards = shards
    self._data = grain.sources.ArrayRecordDataSource(shards)

  def __repr__(self) -> str:
    return f"PreencodedSource({self.path!r}, shards={len(self.shards)}, n={len(self)})"

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    try:
      return {"key": str(index), "record": self._data[int(index)]}
    except Exception:  # a damaged chunk must not stop the job
      return {"key": str(index), "error": "read_error"}


def make_source(
  config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
):
  """This host's part of the source the data config names.

  Tar shards are split between hosts by shard (each host indexes only its own); the
  others by contiguous ranges of examples (which keeps reads local to a few files).

  Args:
    config: the data config (`pipeline.default_data_config()`).
    process_index: this host.
    process_count: number of hosts.

  Returns:
    A random-access source of raw records.
  """
  kind = config.source
  if kind == "tar":
    return tar_shards.TarSource(
      config.tar.paths,
      process_index=process_index,
      process_count=process_count,
      index_dir=config.tar.index_dir,
      image_extensions=tuple(config.tar.image_extensions),
      caption_extensions=tuple(config.tar.caption_extensions),
      retries=config.read_retries,
    )
  if kind == "folder":
    if not config.folder.path:
      raise ValueError("data.source='folder' needs data.folder.path")
    source = folder.FolderSource(
      config.folder.path, config.folder.captions, retries=config.read_retries
    )
  elif kind == "tfds":
    source = TfdsSource(**config.tfds.to_dict())
  elif kind == "preencoded":
    if not config.preencoded.path:
      raise ValueError("data.source='preencoded' needs data.preencoded.path")
    source = PreencodedSource(config.preencoded.path)
  elif kind == "shapes":
    s = config.shapes
    source = shapes.ShapesSource(
      size=s.size or config.resolution,
      seed=s.seed,
      split=s.split,
      forms=tuple(s.forms.items()),
      shape_weights=tuple(s.shape_weights.items()),
      held_out=tuple(s.held_out),
    )
  else:
    raise ValueError(f"unknown data.source {kind!r}; expected one of {SOURCE_KINDS}")
  start, stop = common.host_range(len(source), process_index, process_count)
  if start == stop:
    raise ValueError(f"{source!r} has {len(source)} examples: too few for {process_count} hosts")
  return source if (start, stop) == (0, len(source)) else common.HostSlice(source, start, stop)
