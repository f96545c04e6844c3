"""Input-pipeline throughput: images decoded, cropped and batched per second, and pre-encoded.

    python benchmarks/input_pipeline.py            # ~1 minute on a 2-core machine
    python benchmarks/input_pipeline.py --images=2048 --batch_size=64

Writes a folder of 256x256 JPEGs (smooth random content, ~20 KB each, like a resized
photo) and times `muse_jax.data.pipeline.make_iterator` over it with 0 and 2 worker
processes (random 256 crop, float32 in [-1, 1]); then 512x384 JPEGs, which must be resized
as web images must; then pre-encoded shards (16x16 ids and T5-XXL-sized text embeddings:
20 real tokens of 4096 bf16, padded to 128). The CPU time of the in-process runs gives
examples per core-second, from which it prints how many host cores Muse-3B's input needs,
under the assumptions it prints. (A worker process's CPU time cannot be told apart from its
start-up, so the worker row shows throughput only.)
"""

import argparse
import json
import os
import resource
import tempfile
import time

from array_record.python.array_record_module import ArrayRecordWriter
import ml_dtypes
import numpy as np
from PIL import Image

from muse_jax.data import pipeline, preencode, records

# Muse-3B (paper §4.1): batch 512 on a 512-core TPU-v4 pod (v4-512: 256 chips, 4 per host,
# so 64 hosts), 1M steps in about a week of training: ~0.6 s per step.
GLOBAL_BATCH, HOSTS, STEP_SECONDS = 512, 64, 0.6


def _cpu_seconds() -> float:
  usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
  return sum(u.ru_utime + u.ru_stime for u in usage)


def write_jpegs(root: str, n: int, size: tuple[int, int]) -> None:
  rng = np.random.default_rng(0)
  os.makedirs(root)
  for i in range(n):
    # Smooth content (a random 16x16 image upsampled) and mild noise: JPEG sizes like photos.
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    image = np.asarray(small.resize(size, Image.Resampling.BICUBIC), np.int16)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(os.path.join(root, f"{i:06d}.jpg"), quality=90)
    with open(os.path.join(root, f"{i:06d}.txt"), "w") as f:
      f.write(f"a photo number {i}")


def write_preencoded(root: str, n: int, per_shard: int = 1024) -> None:
  rng = np.random.default_rng(0)
  os.makedirs(root)
  emb = rng.normal(size=(20, 4096)).astype(ml_dtypes.bfloat16)
  for shard, start in enumerate(range(0, n, per_shard)):
    writer = ArrayRecordWriter(
      os.path.join(root, preencode.shard_name(0, 1, shard)), "group_size:1,zstd:3"
    )
    for i in range(start, min(n, start + per_shard)):
      ids = rng.integers(0, 8192, (16, 16)).astype(np.uint16)
      example = dict(
        ids_256=ids, text_emb=emb, text_mask=np.ones(20, bool), caption=f"a photo {i}", key=str(i)
      )
      writer.write(records.pack(example))
    writer.close()
  meta = {
    "format": preencode.FORMAT,
    "process_count": 1,
    "text": {"length": 128, "dim": 4096, "pooled_dim": None},
  }
  with open(os.path.join(root, "metadata.json"), "w") as f:
    json.dump(meta, f)
  with open(os.path.join(root, preencode.host_marker(0, 1)), "w") as f:
    f.write("{}")


def measure(config, batch_size: int, batches: int) -> tuple[float, float | None]:
  """(examples per second, examples per CPU-second or None with workers), after a warm-up."""
  with pipeline.make_iterator(
    config, batch_size=batch_size, seed=0, process_index=0, process_count=1
  ) as it:
    next(it)
    cpu, start = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      next(it)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
  n = batches * batch_size
  return n / wall, (n / cpu if config.num_workers == 0 else None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--threads", type=int, default=4, help="read / decode threads per process")
  args = parser.parse_args()
  print(
    f"machine: {os.cpu_count()} cores; batch {args.batch_size}, {args.threads} threads per process"
  )
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    folders = {"256x256": os.path.join(tmp, "256"), "512x384": os.path.join(tmp, "512")}
    for (name, folder), size in zip(folders.items(), ((256, 256), (512, 384)), strict=True):
      write_jpegs(folder, args.images, size)
      kb = sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".jpg")
      )
      print(f"{args.images} JPEGs of {name}, {kb / args.images / 1024:.1f} KB each on average")
    encoded = os.path.join(tmp, "encoded")
    write_preencoded(encoded, args.images)

    for name, workers in (("256x256", 0), ("256x256", 2), ("512x384", 0)):
      c = pipeline.default_data_config()
      c.update(
        source="folder",
        resolution=256,
        crop="random",
        num_workers=workers,
        num_threads=args.threads,
      )
      c.folder.path = folders[name]
      results[f"jpeg {name}, {workers} workers"] = measure(c, args.batch_size, args.batches)
    c = pipeline.default_data_config()
    c.update(source="preencoded", num_threads=args.threads)
    c.preencoded.path = encoded
    results["pre-encoded, 0 workers"] = measure(c, args.batch_size, args.batches)

  per_host = GLOBAL_BATCH / HOSTS / STEP_SECONDS
  print(f"\n{'input':<30}{'examples/s':>12}{'per core-s':>12}{'cores/host':>12}")
  for name, (rate, per_core) in results.items():
    if per_core is None:
      print(f"{name:<30}{rate:>12.0f}{'-':>12}{'-':>12}")
    else:
      print(f"{name:<30}{rate:>12.0f}{per_core:>12.0f}{per_host / per_core:>12.3f}")
  print(
    f"\ncores/host: one host must supply {GLOBAL_BATCH} (global batch) / {HOSTS} (hosts) / "
    f"{STEP_SECONDS} s (step) = {per_host:.1f} examples/s, assuming Muse-3B on a v4-512 pod "
    "(64 hosts x 4 chips) at ~0.6 s per step (1M steps in ~1 week, paper §4.1); divided by the "
    "measured examples per core-second."
  )


if __name__ == "__main__":
  main()
