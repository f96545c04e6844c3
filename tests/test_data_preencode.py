"""Tests of pre-encoding: shards, resume, host split, reading back, and the record format."""

import json
import os

import ml_dtypes
import numpy as np
from PIL import Image
import pytest

from muse_jax.data import pipeline, preencode, records, shapes, sources

T, D, P = 6, 4, 3  # text length, width, pooled width of the fake encoder


def _fake_tokenizer(name: str, resolution: int, factor: int) -> preencode.ImageTokenizer:
  """ids = mean red level of each factor x factor block, in [0, 256)."""

  def encode(images: np.ndarray) -> np.ndarray:
    assert images.dtype == np.uint8 and images.shape[1:] == (resolution, resolution, 3)
    b, g = len(images), resolution // factor
    blocks = images[..., 0].reshape(b, g, factor, g, factor).astype(np.float32)
    return blocks.mean(axis=(2, 4)).astype(np.int32)

  return preencode.ImageTokenizer(name, resolution, encode)


def _fake_text(captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Token j of a caption embeds (word length, j, first letter, 1); padding is zero."""
  emb = np.zeros((len(captions), T, D), np.float32)
  mask = np.zeros((len(captions), T), bool)
  for i, caption in enumerate(captions):
    for j, word in enumerate(caption.split()[:T]):
      emb[i, j] = (len(word), j, ord(word[0]), 1)
      mask[i, j] = True
  return emb, mask, emb.sum(axis=1)[:, :P]


def _shapes_folder(root, n: int = 11) -> list[dict]:
  src = shapes.ShapesSource(size=64, seed=4)
  shapes.write_folder(root, n, src, progress=False)
  # One unreadable image among them, to be skipped and counted.
  (root / "images" / "00000003.png").write_bytes(b"not a png")
  return [src[i] for i in range(n)]


def _config(root, **kwargs):
  c = pipeline.default_data_config()
  c.source = "folder"
  c.folder.path = str(root)
  c.update(kwargs)
  return c


def _run(source_root, out, process_index=0, process_count=1, per_shard=4):
  source = sources.make_source(
    _config(source_root), process_index=process_index, process_count=process_count
  )
  return preencode.preencode(
    source,
    out,
    tokenizers=[_fake_tokenizer("32", 32, 8), _fake_tokenizer("64", 64, 8)],
    encode_text=_fake_text,
    batch_size=3,
    examples_per_shard=per_shard,
    process_index=process_index,
    process_count=process_count,
    num_threads=2,
    progress=False,
  )


def _read(out, **overrides) -> list[dict]:
  c = pipeline.default_data_config()
  c.update(source="preencoded", shuffle=False, num_epochs=1, drop_remainder=False, **overrides)
  c.preencoded.path = str(out)
  with pipeline.make_iterator(c, batch_size=4, process_index=0, process_count=1) as it:
    return list(it)


def test_preencode_writes_what_the_encoders_give(tmp_path):
  examples = _shapes_folder(tmp_path / "src")
  out = tmp_path / "out"
  totals = _run(tmp_path / "src", out)
  assert totals["shards_written"] == 3 and totals["examples"] == 10
  assert totals["skipped/not_an_image"] == 1
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["tokenizers"]["32"] == {"feature": "ids_32", "resolution": 32, "grid": [4, 4]}
  assert meta["text"] == {"length": T, "dim": D, "pooled_dim": P}
  uncond = np.load(out / preencode.UNCOND_FILE)
  assert uncond["text_emb"].shape == (T, D) and not uncond["text_mask"].any()

  batches = _read(out)
  ids64 = np.concatenate([b["ids_64"] for b in batches])
  assert ids64.shape == (10, 8, 8) and ids64.dtype == np.int32
  assert (
    batches[0]["text_emb"].dtype == ml_dtypes.bfloat16 and batches[0]["text_mask"].dtype == bool
  )
  keys = [k for b in batches for k in b["key"]]
  assert keys == [f"images/{i:08d}.png" for i in range(11) if i != 3]
  for b in batches:
    emb, mask, pooled = _fake_text(list(b["caption"]))
    np.testing.assert_array_equal(b["text_emb"].astype(np.float32), emb)
    np.testing.assert_array_equal(b["text_mask"], mask)
    np.testing.assert_array_equal(
      b["text_pooled"], pooled.astype(ml_dtypes.bfloat16)
    )  # stored in bf16
    for key, ids32, ids64 in zip(b["key"], b["ids_32"], b["ids_64"], strict=True):
      example = examples[int(key[7:15])]
      assert b["caption"][list(b["key"]).index(key)] == example["caption"]
      image = example["image"]
      np.testing.assert_array_equal(ids64, _fake_tokenizer("64", 64, 8).encode(image[None])[0])
      small = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BICUBIC))
      np.testing.assert_array_equal(ids32, _fake_tokenizer("32", 32, 8).encode(small[None])[0])


def test_preencode_resumes_and_never_leaves_half_a_shard(tmp_path):
  _shapes_folder(tmp_path / "src")
  out = tmp_path / "out"
  _run(tmp_path / "src", out)
  before = _read(out)
  shards = sorted(p.name for p in out.glob("shard-*.array_record"))
  os.remove(out / shards[1])
  (out / f".{shards[1]}.tmp123").write_bytes(b"half a shard")  # what a killed job leaves
  totals = _run(tmp_path / "src", out)
  assert totals["shards_written"] == 1 and totals["shards_already_done"] == 2
  assert not list(out.glob(".*tmp*"))
  after = _read(out)
  assert [list(b["key"]) for b in after] == [list(b["key"]) for b in before]
  for a, b in zip(after, before, strict=True):
    np.testing.assert_array_equal(a["ids_32"], b["ids_32"])


def test_preencode_hosts_split_the_source(tmp_path):
  _shapes_folder(tmp_path / "src")
  out = tmp_path / "out"
  for p in range(2):
    _run(tmp_path / "src", out, process_index=p, process_count=2)
  assert len(list(out.glob("host-*-of-002.json"))) == 2
  names = sorted(p.name for p in out.glob("shard-*.array_record"))
  assert names[0].startswith("shard-h000of002") and names[-1].startswith("shard-h001of002")
  keys = [k for b in _read(out) for k in b["key"]]
  assert sorted(keys) == [f"images/{i:08d}.png" for i in range(11) if i != 3]


def test_trainer_view_of_pre_encoded_shards(tmp_path):
  _shapes_folder(tmp_path / "src")
  out = tmp_path / "out"
  _run(tmp_path / "src", out)
  it = pipeline.pre_encoded_batches(
    str(out),
    batch_size=4,
    ids_key="ids_64",
    low_res_ids_key="ids_32",
    text_length=8,
    process_index=0,
    process_count=1,
  )
  batch = next(it)
  assert set(batch) == {"ids", "low_res_ids", "text_emb", "text_mask", "text_pooled"}
  assert batch["ids"].shape == (4, 64) and batch["low_res_ids"].shape == (4, 16)
  assert batch["text_emb"].shape == (4, 8, D) and not batch["text_mask"][:, T:].any()
  state = it.get_state()
  following = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["ids"], following["ids"])


def test_records_round_trip_and_reject_garbage():
  example = {
    "ids": np.arange(12, dtype=np.uint16).reshape(3, 4),
    "emb": np.linspace(-2, 2, 10).astype(ml_dtypes.bfloat16).reshape(2, 5),
    "mask": np.array([True, False]),
    "caption": "café",
  }
  back = records.unpack(records.pack(example))
  assert back["caption"] == "café"
  for key in ("ids", "emb", "mask"):
    assert back[key].dtype == example[key].dtype
    np.testing.assert_array_equal(back[key], example[key])
  with pytest.raises(ValueError, match="not a muse_jax record"):
    records.unpack(b"garbage!")
  with pytest.raises(ValueError, match="ends at"):
    records.unpack(records.pack(example)[:-3])


def test_tokenizer_flag_parsing():
  assert preencode.parse_tokenizer("256=gs://b/vq_f16") == ("256", 256, "gs://b/vq_f16")
  assert preencode.parse_tokenizer("lo@256=/x=y") == ("lo", 256, "/x=y")
  with pytest.raises(ValueError, match="RESOLUTION=PATH"):
    preencode.parse_tokenizer("/ckpt/vq")


def test_preencode_with_the_real_tokenizer_and_text_encoder(tmp_path, fixtures_dir):
  import jax

  from muse_jax import partitioning
  from muse_jax.vq_tokenizer import load_tokenizer

  examples = _shapes_folder(tmp_path / "src", n=5)
  mesh = partitioning.make_mesh(devices=jax.local_devices())
  vq, clip = fixtures_dir / "vq" / "amused_tiny", fixtures_dir / "text" / "clip"
  source = sources.make_source(_config(tmp_path / "src"))
  preencode.preencode(
    source,
    tmp_path / "out",
    tokenizers=[preencode.image_tokenizer("64", 64, str(vq), mesh)],
    encode_text=preencode.text_encoder(str(clip), 0, "float32", mesh),
    batch_size=8,
    progress=False,
  )
  in_order = pipeline.default_data_config()
  in_order.shuffle = False
  batch = next(
    pipeline.pre_encoded_batches(
      str(tmp_path / "out"),
      batch_size=4,
      ids_key="ids_64",
      process_index=0,
      process_count=1,
      config=in_order,
    )
  )
  assert batch["text_pooled"].shape[0] == 4 and batch["text_mask"].any(axis=1).all()
  good = [e["image"] for i, e in enumerate(examples) if i != 3]
  direct = np.asarray(load_tokenizer(vq).encode(np.stack(good)))  # [4, 32, 32]: f = 2
  np.testing.assert_array_equal(batch["ids"], direct.reshape(4, -1))
