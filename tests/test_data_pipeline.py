"""Tests of the input pipeline: sources, bad data, host splits, exact resume, worker processes."""

import io
import json
import pathlib
import tarfile

import numpy as np
from PIL import Image
import pytest

from muse_jax.data import pipeline, shapes, sources, tar_shards, transforms

R = 32  # crop side in these tests


def _config(**overrides):
  c = pipeline.default_data_config()
  c.resolution = R
  c.shuffle = False
  c.num_epochs = 1
  c.drop_remainder = False
  c.num_threads = 2
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, fmt)
  return buf.getvalue()


def _two_colour(i: int, width: int = 48, height: int = 40) -> np.ndarray:
  """Left half red-ish, right half blue-ish; the red level encodes i (to identify it)."""
  image = np.zeros((height, width, 3), np.uint8)
  image[:, : width // 2] = (100 + 4 * i, 0, 0)
  image[:, width // 2 :] = (0, 0, 200)
  return image


def _all(it) -> list[dict]:
  batches = list(it)
  it.close()
  return batches


def _keys(batches) -> list[str]:
  return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------------------- sources


def _folder_with_sidecars(root: pathlib.Path, n: int) -> list[str]:
  for i in range(n):
    (root / f"img{i:03d}.png").write_bytes(_encode(_two_colour(i)))
    (root / f"img{i:03d}.txt").write_text(f"caption {i}\n")
  return [f"img{i:03d}.png" for i in range(n)]


def test_folder_sidecar_source_decodes_crops_and_scales(tmp_path):
  _folder_with_sidecars(tmp_path, 5)
  batches = _all(
    pipeline.make_iterator(
      _config(source="folder", **{"folder.path": str(tmp_path)}),
      batch_size=2,
      seed=0,
      process_index=0,
      process_count=1,
    )
  )
  assert [len(b["key"]) for b in batches] == [2, 2, 1]
  images = np.concatenate([b["image"] for b in batches])
  captions = [c for b in batches for c in b["caption"]]
  assert images.shape == (5, R, R, 3) and images.dtype == np.float32
  assert captions == [f"caption {i}" for i in range(5)]
  # Centred crop of the 40x40 middle of a 48x40 image: left half red, right half blue.
  for i, image in enumerate(images):
    np.testing.assert_allclose(
      image[R // 2, 2], np.array([100 + 4 * i, 0, 0]) / 127.5 - 1, atol=0.02
    )
    np.testing.assert_allclose(image[R // 2, R - 3], np.array([0, 0, 200]) / 127.5 - 1, atol=0.02)


def test_folder_captions_files(tmp_path):
  for i in range(3):
    (tmp_path / f"{i}.png").write_bytes(_encode(_two_colour(i)))
  rows = [{"file": f"{i}.png", "caption": f"json {i}"} for i in range(3)]
  (tmp_path / "captions.jsonl").write_text("\n".join(map(json.dumps, rows)))
  c = _config(source="folder", output="uint8", **{"folder.path": str(tmp_path)})
  batches = _all(pipeline.make_iterator(c, batch_size=3, process_index=0, process_count=1))
  assert list(batches[0]["caption"]) == ["json 0", "json 1", "json 2"]
  assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"][0, 16, 2, 0] == 100
  (tmp_path / "list.csv").write_text('file_name,text\n2.png,"csv, two"\n0.png,csv zero\n')
  c.folder.captions = "list.csv"
  batches = _all(pipeline.make_iterator(c, batch_size=3, process_index=0, process_count=1))
  assert list(batches[0]["caption"]) == ["csv, two", "csv zero"]


def _tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _tar_shards(root: pathlib.Path, shards: int, per_shard: int) -> list[str]:
  keys = []
  for s in range(shards):
    members = []
    for j in range(per_shard):
      i = s * per_shard + j
      members.append((f"part/{i:05d}.jpg", _encode(_two_colour(i % 30), "JPEG")))
      if i % 2:
        members.append(
          (f"part/{i:05d}.json", json.dumps({"caption": f"tar {i}", "url": "x"}).encode())
        )
      else:
        members.append((f"part/{i:05d}.txt", f"tar {i}".encode()))
      keys.append(f"shard-{s:02d}.tar/part/{i:05d}")
    _tar(root / f"shard-{s:02d}.tar", members)
  return keys


def test_tar_shards_source(tmp_path):
  keys = _tar_shards(tmp_path, 3, 4)
  spec = str(tmp_path / "shard-{00..01}.tar") + "," + str(tmp_path / "shard-02*")
  assert tar_shards.expand_paths(spec) == [str(tmp_path / f"shard-0{s}.tar") for s in range(3)]
  assert tar_shards.split_key("a/b/000.x.json") == ("a/b/000", "x.json")
  index_dir = tmp_path / "index"
  c = _config(source="tar", **{"tar.paths": spec, "tar.index_dir": str(index_dir)})
  batches = _all(pipeline.make_iterator(c, batch_size=5, process_index=0, process_count=1))
  assert _keys(batches) == keys
  assert [c for b in batches for c in b["caption"]] == [f"tar {i}" for i in range(12)]
  assert len(list(index_dir.iterdir())) == 3  # cached, and used on the next start
  source = tar_shards.TarSource(spec, index_dir=str(index_dir))
  assert source[5]["caption"] == "tar 5" and source[4]["caption"] == b"tar 4"  # .json, .txt
  assert tar_shards.TarSource(spec, process_index=1, process_count=2).shards == [
    str(tmp_path / "shard-01.tar")
  ]
  with pytest.raises(ValueError, match="compressed"):
    tar_shards.expand_paths(str(tmp_path / "x.tar.gz"))


def test_tar_shards_that_are_broken_are_counted(tmp_path):
  _tar_shards(tmp_path, 2, 3)
  whole = (tmp_path / "shard-01.tar").read_bytes()
  (tmp_path / "shard-01.tar").write_bytes(whole[: len(whole) // 2])  # cut inside example 4
  (tmp_path / "shard-02.tar").write_bytes(b"no tar at all" * 100)
  it = pipeline.make_iterator(
    _config(source="tar", **{"tar.paths": str(tmp_path / "*.tar")}),
    batch_size=8,
    process_index=0,
    process_count=1,
  )
  keys = _keys(list(it))
  stats = it.stats()
  assert stats["skipped/bad_shard"] == 2 and stats["skipped"] == 2  # cut short, and no tar
  whole_examples = [f"shard-00.tar/part/{i:05d}" for i in range(3)]
  assert keys == whole_examples + ["shard-01.tar/part/00003", "shard-01.tar/part/00004"]


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  import sys

  import tensorflow_datasets as tfds

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
      }
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):  # Encoded bytes: TFDS encodes arrays with TensorFlow, bytes without.
        yield (
          i,
          {
            "image": io.BytesIO(_encode(_two_colour(i))),
            "captions": {"text": [f"first {i}", f"second {i}"]},
          },
        )

  builder = TinyCaptions(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  c = _config(source="tfds", output="uint8")
  c.tfds.update(builder_dir=builder.data_dir, caption_feature="captions/text")
  batches = _all(pipeline.make_iterator(c, batch_size=4, process_index=0, process_count=1))
  batch = batches[0]
  for image, caption in zip(batch["image"], batch["caption"], strict=True):
    i = int(caption.split()[-1])
    assert caption in (f"first {i}", f"second {i}") and image[16, 2, 0] == 100 + 4 * i
  by_name = sources.TfdsSource(name="tiny_captions", data_dir=str(tmp_path), split="train[:3]")
  assert len(by_name) == 3 and by_name[0]["image"][:4] == b"\x89PNG"  # left encoded for us
  assert "tensorflow" not in sys.modules


def test_shapes_source_through_the_pipeline():
  c = _config(source="shapes", shuffle=True, num_epochs=None, **{"shapes.size": 64})
  it = pipeline.make_iterator(c, batch_size=4, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (4, R, R, 3)
  assert all(shapes.parse_caption(c) for c in batch["caption"])


# ----------------------------------------------------------------------------- bad data


def _zoo(root: pathlib.Path) -> dict[str, int]:
  """A folder with one file per kind of bad data; returns the expected counts."""
  good = _two_colour(0)
  gray = np.asarray(Image.fromarray(good).convert("L"))
  files = {
    "good.png": _encode(good),
    "good.jpg": _encode(good, "JPEG"),
    "gray.png": _encode(gray),
    "rgba.png": _encode(np.dstack([good, np.full(good.shape[:2], 128, np.uint8)])),
    "cmyk.jpg": (
      lambda b: (Image.fromarray(good).convert("CMYK").save(b, "JPEG"), b.getvalue())[1]
    )(io.BytesIO()),
    "palette.png": (lambda b: (Image.fromarray(good).convert("P").save(b, "PNG"), b.getvalue())[1])(
      io.BytesIO()
    ),
    "deep.png": _encode((gray.astype(np.uint16) * 257), "PNG"),
    "small.png": _encode(good[:20, :20]),  # 20 >= 0.5 x 32: upscaled
    "tiny.png": _encode(good[:10, :10]),  # 10 < 16: skipped
    "truncated.jpg": _encode(good, "JPEG")[:400],
    "corrupt.png": _encode(good)[:50] + bytes(200),
    "text.jpg": b"this is not an image at all",
    "huge.png": _encode(np.zeros((200, 200, 3), np.uint8)),  # over max_image_pixels below
    "nocaption.png": _encode(good),
    "emptycaption.png": _encode(good),
    "latin1.png": _encode(good),
  }
  for name, data in files.items():
    (root / name).write_bytes(data)
  lines = [
    json.dumps({"file": name, "caption": f"a {name}"}).encode()
    for name in files
    if name not in ("nocaption.png", "emptycaption.png", "latin1.png")
  ]
  lines += [
    json.dumps({"file": "nocaption.png"}).encode(),
    json.dumps({"file": "emptycaption.png", "caption": "  \n "}).encode(),
    '{"file": "latin1.png", "caption": "caf\u00e9 cr\u00e8me"}'.encode("cp1252"),
    json.dumps({"file": "missing.png", "caption": "gone"}).encode(),
    b'{"file": "broken.png", "caption": ',
  ]
  (root / "captions.jsonl").write_bytes(b"\n".join(lines))
  return {
    "examples": 9,  # good x2, gray, rgba, cmyk, palette, deep, small, latin1
    "skipped/truncated_image": 1,
    "skipped/corrupt_image": 1,
    "skipped/not_an_image": 1,
    "skipped/image_too_large": 1,
    "skipped/image_too_small": 1,
    "skipped/missing_caption": 1,
    "skipped/empty_caption": 1,
    "skipped/missing_image": 1,
    "skipped/bad_record": 1,
    "converted/grayscale": 2,  # gray.png and deep.png
    "converted/alpha": 1,
    "converted/cmyk": 1,
    "converted/palette": 1,
    "converted/high_bit_depth": 1,
    "converted/upscaled": 1,
    "converted/caption_not_utf8": 1,
  }


def _zoo_config(root, **overrides):
  return _config(
    source="folder", max_image_pixels=100 * 100, **{"folder.path": str(root)}, **overrides
  )


def test_corrupt_file_zoo_is_skipped_converted_and_counted(tmp_path):
  want = _zoo(tmp_path)
  it = pipeline.make_iterator(_zoo_config(tmp_path), batch_size=4, process_index=0, process_count=1)
  batches = list(it)
  stats = it.stats()
  got = {k: v for k, v in stats.items() if v and k != "skipped"}
  assert got == want
  assert stats["skipped"] == 9
  images = np.concatenate([b["image"] for b in batches])
  assert images.shape == (9, R, R, 3) and np.isfinite(images).all()
  assert images.min() >= -1 and images.max() <= 1
  captions = {c for b in batches for c in b["caption"]}
  assert "a latin1.png" not in captions and "café crème" in captions
  assert "skipped/missing_image=1" in pipeline.format_stats(stats)


def test_image_modes_convert_to_the_same_pixels():
  rgb = _two_colour(3)
  t = transforms.ImageTransform(resolution=R, crop="center", output="uint8")
  rng = np.random.default_rng(0)
  reference = t({"image": _encode(rgb), "caption": "x"}, rng)["image"]
  rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
  for raw in (rgb, rgba, _encode(rgba), _encode(rgb, "JPEG")):
    out = t({"image": raw, "caption": "x"}, rng)
    assert np.abs(out["image"].astype(int) - reference).mean() <= 2  # JPEG: chroma at the edge
  # Half-transparent pixels are composited on white.
  rgba[..., 3] = 0
  assert (t({"image": rgba, "caption": "x"}, rng)["image"] == 255).all()


def test_captions_decode_or_count():
  rng = np.random.default_rng(0)
  assert transforms.decode_caption(b"\xef\xbb\xbfplain", rng) == ("plain", [])
  text, events = transforms.decode_caption("na\u00efve".encode("cp1252"), rng)
  assert text == "na\u00efve" and events == [transforms.EVENT_INDEX["converted/caption_not_utf8"]]
  assert transforms.decode_caption(b"\x81\x8d bad", rng)[0].endswith("bad")
  assert transforms.decode_caption([b"", b"only"], rng) == ("only", [])
  assert transforms.decode_caption(["a\tb\n\x00c"], rng) == ("a b c", [])
  assert transforms.decode_caption(None, rng) == (None, [])


def test_random_crops_move_and_centre_crops_do_not():
  rng = np.random.default_rng(0)
  boxes = {transforms.crop_box(100, 40, "random", rng) for _ in range(20)}
  assert len(boxes) > 5 and all(b[2] - b[0] == 40 and 0 <= b[0] <= 60 for b in boxes)
  assert transforms.crop_box(100, 40, "center", rng) == (30.0, 0.0, 70.0, 40.0)


# ----------------------------------------------------------------------------- hosts and resume


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_host_parts_are_disjoint_and_complete(tmp_path, kind):
  if kind == "folder":
    everything = set(_folder_with_sidecars(tmp_path, 23))
    c = _config(source="folder", shuffle=True, **{"folder.path": str(tmp_path)})
  else:
    everything = set(_tar_shards(tmp_path, 5, 3))
    c = _config(source="tar", shuffle=True, **{"tar.paths": str(tmp_path / "*.tar")})
  parts = [
    set(_keys(_all(pipeline.make_iterator(c, batch_size=4, process_index=p, process_count=3))))
    for p in range(3)
  ]
  assert set.union(*parts) == everything
  assert sum(map(len, parts)) == len(everything)


def test_resume_yields_exactly_what_an_uninterrupted_run_yields(tmp_path):
  _zoo(tmp_path)
  c = _zoo_config(tmp_path, shuffle=True, num_epochs=None, crop="random")
  make = lambda: pipeline.make_iterator(c, batch_size=3, seed=5, process_index=0, process_count=1)
  straight = make()
  expected = [next(straight) for _ in range(12)]  # 4 epochs of 9 good examples
  keys = _keys(expected)
  assert set(keys[:9]) == set(keys[9:18]) and keys[:9] != keys[9:18]  # reshuffled each epoch
  first = make()
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = make()
  resumed.set_state(state)
  for want in expected[5:]:
    got = next(resumed)
    assert list(got["key"]) == list(want["key"])
    np.testing.assert_array_equal(got["image"], want["image"])
  assert resumed.stats() == straight.stats()
  other = _zoo_config(tmp_path, shuffle=True, num_epochs=None)
  with pytest.raises(ValueError, match="batch_size: saved 3, now 4"):
    pipeline.make_iterator(other, batch_size=4, seed=5, process_index=0, process_count=1).set_state(
      state
    )


def test_worker_processes_count_and_resume(tmp_path):
  # Worker processes take seconds to start (each imports grain, hence jax): one test.
  want = _zoo(tmp_path)
  c = _zoo_config(tmp_path, num_workers=2, shuffle=True)
  make = lambda: pipeline.make_iterator(c, batch_size=2, seed=1, process_index=0, process_count=1)
  with make() as straight:
    expected, state = [next(straight), next(straight)], straight.get_state()
    expected += list(straight)
  stats = straight.stats()
  # Each worker counts its own examples; the sums arrive with the batches.
  assert {k: v for k, v in stats.items() if v and k != "skipped"} == want
  with make() as resumed:
    resumed.set_state(json.loads(json.dumps(state)))
    rest = list(resumed)
  assert [list(b["key"]) for b in rest] == [list(b["key"]) for b in expected[2:]]
  assert resumed.stats() == stats


def test_make_source_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    sources.make_source(_config(source="folder", **{"folder.path": str(tmp_path / "nope")}))
  with pytest.raises(ValueError, match="unknown data.source 'nope'"):
    sources.make_source(_config(source="nope"))
  _folder_with_sidecars(tmp_path, 2)
  with pytest.raises(ValueError, match="too few for 3 hosts"):
    sources.make_source(
      _config(source="folder", **{"folder.path": str(tmp_path)}), process_index=0, process_count=3
    )
