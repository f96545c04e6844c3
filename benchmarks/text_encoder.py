"""Loading memory and encoding speed of the frozen text encoders on 8 (fake) devices.

For a random T5 of at least 1B parameters (default: T5 v1.1 XL's encoder, 1.22B) and
for CLIP-L/14's text tower, the script writes a Hugging Face folder as transformers
would (config.json, sharded `model-0000i-of-0000n.safetensors` + index, one shard per
layer, written layer by layer so the writer never holds the model), then, in a fresh
process with XLA_FLAGS=--xla_force_host_platform_device_count=8, loads it with
`TextEncoder.from_pretrained(..., mesh=(fsdp=4, tensor=2))` and reports:

* peak host memory (ru_maxrss) before and after loading. Fake CPU devices keep their
  buffers in host memory, so the loaded parameters themselves count: the figure to
  read is the peak *above* baseline + parameter bytes, i.e. what loading costs beyond
  the one copy of the weights that must exist (about the largest tensor, not a model);
* prompts per second of the compiled encode function (after one warm-up call).

    python benchmarks/text_encoder.py                # T5 v1.1 XL (1.22B) + CLIP-L/14
    python benchmarks/text_encoder.py --t5=t5_v1_1_large --batch=16 --dtype=bfloat16

Weights are stored in bf16 by default (the machine this was written on has 24 GiB
shared; fp32 would double both the files and the resident parameters) and computed in
float32 (XLA:CPU's bf16 matmuls are several times slower than its float32 ones).
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))

from configs import text_encoders  # noqa: E402
from muse_jax.convert.random_init import write_random_folder  # noqa: E402

_FIXTURES = _REPO / "tests" / "fixtures" / "text"
_PROMPTS = [
  "a photo of a red fox jumping over a lazy brown dog",
  "an astronaut riding a horse on the moon, oil painting",
  "",
  "café crème brûlée in Zürich at dawn 🐶",
]


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB.


def _rss_gb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def measure(
  folder: str, dtype: str, param_dtype: str, batch: int, max_length: int, iters: int
) -> dict:
  """Runs in a fresh process: load onto 8 fake devices, then time encode()."""
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )
  import jax
  import jax.numpy as jnp

  from muse_jax.partitioning import make_mesh
  from muse_jax.text import TextEncoder

  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  jax.jit(lambda x: x + 1)(jnp.zeros(8)).block_until_ready()  # runtime up before the baseline.
  base_rss, base_peak = _rss_gb(), _peak_rss_gb()
  start = time.perf_counter()
  encoder = TextEncoder.from_pretrained(
    folder,
    dtype=jnp.dtype(dtype),
    param_dtype=jnp.dtype(param_dtype),
    mesh=mesh,
    max_length=max_length,
  )
  jax.block_until_ready(encoder.params)
  load_s = time.perf_counter() - start
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(encoder.params))
  largest = max(
    x.nbytes for x in jax.tree.leaves(encoder.params) if x.ndim < 3
  )  # an unstacked tensor.
  largest = max(
    largest, max(x.nbytes // x.shape[0] for x in jax.tree.leaves(encoder.params) if x.ndim >= 3)
  )
  loaded_peak = _peak_rss_gb()

  prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(batch)]
  start = time.perf_counter()
  jax.block_until_ready(encoder.encode(prompts))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(iters):
    out = encoder.encode(prompts)
  jax.block_until_ready(out)
  step_s = (time.perf_counter() - start) / iters
  return {
    "params": sum(x.size for x in jax.tree.leaves(encoder.params)),
    "param_gb": param_bytes / 2**30,
    "largest_tensor_gb": largest / 2**30,
    "baseline_rss_gb": base_rss,
    "peak_before_load_gb": base_peak,
    "peak_after_load_gb": loaded_peak,
    "load_overhead_gb": loaded_peak - base_rss - param_bytes / 2**30,
    "load_s": load_s,
    "first_encode_s": compile_s,
    "prompts_per_s": batch / step_s,
    "shape": f"B={batch} T={encoder.max_length} D={encoder.embed_dim}",
    "finite": bool(np.isfinite(np.asarray(out.embeddings, np.float32)).all()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--t5", default="t5_v1_1_xl", help="configs/text_encoders.py variant (>= 1B params)"
  )
  parser.add_argument("--clip", default="clip_l14", help="configs/text_encoders.py variant")
  parser.add_argument(
    "--dtype", default="float32", choices=["bfloat16", "float32"], help="compute dtype"
  )
  parser.add_argument(
    "--param_dtype",
    default="bfloat16",
    choices=["bfloat16", "float32"],
    help="dtype of the files and parameters",
  )
  parser.add_argument("--batch", type=int, default=8, help="prompts per encode call")
  parser.add_argument("--t5_length", type=int, default=32, help="T5 tokens per prompt")
  parser.add_argument("--iters", type=int, default=3, help="timed encode calls")
  parser.add_argument(
    "--workdir", default=None, help="where to write the random folders (default: a temp dir)"
  )
  parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_length", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._measure:
    print(
      json.dumps(
        measure(args._measure, args.dtype, args.param_dtype, args.batch, args._length, args.iters)
      )
    )
    return

  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="text_encoder_bench_"))
  try:
    for variant, length in ((args.t5, args.t5_length), (args.clip, 77)):
      config = text_encoders.get_config(variant)
      folder = workdir / variant
      shutil.rmtree(folder, ignore_errors=True)
      start = time.perf_counter()
      count = write_random_folder(
        folder,
        config.hf_config.to_dict(),
        args.param_dtype,
        tokenizer_from=_FIXTURES / ("t5_v1_1" if config.hf_config.model_type == "t5" else "clip"),
      )
      write_s = time.perf_counter() - start
      writer_peak = _peak_rss_gb()
      cmd = [sys.executable, __file__, "--_measure", str(folder), "--_length", str(length)]
      cmd += ["--dtype", args.dtype, "--param_dtype", args.param_dtype]
      cmd += ["--batch", str(args.batch), "--iters", str(args.iters)]
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      if result.returncode:
        sys.exit(f"measuring {variant} failed:\n{result.stderr[-3000:]}")
      r = json.loads(result.stdout.strip().splitlines()[-1])
      print(
        f"{variant}: {count / 1e9:.3f}B params stored in {args.param_dtype}, computed in {args.dtype}, "
        "8 fake CPU devices (fsdp=4, tensor=2)\n"
        f"  write {write_s:.1f} s (writer peak RSS {writer_peak:.2f} GB, whole process so far)\n"
        f"  load {r['load_s']:.1f} s: RSS baseline {r['baseline_rss_gb']:.2f} GB, peak after load "
        f"{r['peak_after_load_gb']:.2f} GB = baseline + params {r['param_gb']:.2f} GB + "
        f"{r['load_overhead_gb']:.2f} GB overhead (largest single tensor {r['largest_tensor_gb']:.3f} GB)\n"
        f"  encode {r['shape']}: first call {r['first_encode_s']:.1f} s, then {r['prompts_per_s']:.1f} prompts/s"
        f" (finite outputs: {r['finite']})"
      )
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
