r"""Where a compiled program's time goes on a CPU: XLA op time by op kind and by module.

Traces a few calls of one jitted function with ``jax.profiler`` (no TensorBoard needed:
the trace's JSON is read here), maps each executed XLA op back to the Flax module that
emitted it (the HLO's ``op_name`` metadata), and prints the op time per call:

- by kind: ``dot`` (YNNPACK / Eigen matmuls) against everything else (fusions of
  elementwise ops, transposes, converts, broadcasts, reductions);
- by module path (layer indices folded, so all layers of a stack add up);
- the slowest single ops, with their output shapes.

Targets (``--target``):
  demo-step   forward + backward of the demo's base transformer (configs/demo.py), batch 64
  demo-vq-step  forward + backward of the demo's VQ tokenizer (its pixel loss), batch 8
  uvit-mid    one guided call of the mid-size aMUSEd U-ViT (benchmarks/amused_vs_diffusers.py)
  uvit-full   the same at amused-256 size
  vq-decode   aMUSEd's VQ decoder (f = 16, 146M parameters): 16x16 ids to one 256x256 image

  python benchmarks/op_profile.py --target demo-step
  python benchmarks/op_profile.py --target uvit-mid --dtype bfloat16

Op times are summed over the ops XLA ran one after another, so on 2 cores they can add
up to a little less or more than the wall time. U-ViT weights are cast to the compute
dtype beforehand, as the decode loop does once before its first step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `configs` is a folder of the checkout, not a package

REPEATS = 3
_LAYER_INDEX = re.compile(r"_\d+$")
_SKIP = ("ThunkExecutor", "block_until_ready", "try_to_block", "SlinkyThreadPool", "PjRt", "Pjit")


def demo_step(dtype: str):
  """(function, args): loss gradient of the demo's base on random tokens and text."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import configs.demo
  from muse_jax.demo import build
  from muse_jax.trainers import transformer as transformer_trainer

  c = build.base_trainer_config(configs.demo.get_config(), pathlib.Path("unused"))
  c.model.dtype = dtype
  model = transformer_trainer.make_model(c.model)
  rng = np.random.default_rng(0)
  batch, length = c.train.batch_size, model.length
  ids = jnp.asarray(rng.integers(0, model.vocab_size + 1, (batch, length)), jnp.int32)
  text = jnp.asarray(rng.standard_normal((batch, c.text.length, c.text.dim)), jnp.float32)
  mask = jnp.ones((batch, c.text.length), bool)
  params = jax.jit(lambda: model.init(jax.random.key(0), ids, text, mask)["params"])()

  def loss(p):
    logits = model.apply({"params": p}, ids, text, mask)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  return jax.grad(loss), (params,)


def demo_vq_step(dtype: str):
  """(function, args): pixel-loss gradient of the demo's VQ tokenizer, batch 8."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import configs.demo
  from muse_jax.demo import build
  from muse_jax.trainers import vqgan as vq_trainer

  config = configs.demo.get_config()
  c = build.tokenizer_trainer_config(config)
  c.model.dtype = dtype
  model = vq_trainer.make_model(c.model)
  rng = np.random.default_rng(0)
  size = config.image_size
  x = jnp.asarray(rng.uniform(-1, 1, (config.tokenizer.batch_size, size, size, 3)), jnp.float32)
  params = jax.jit(lambda: model.init(jax.random.key(0), x)["params"])()

  def loss(p):
    rec, _ = model.apply({"params": p}, x)  # (images_hat, the quantizer's aux)
    return jnp.mean((rec - x) ** 2)

  return jax.grad(loss), (params,)


def uvit_call(size: str, dtype: str):
  """(function, args): one guided U-ViT call (batch 2: the prompt and the negative)."""
  import jax
  import jax.numpy as jnp

  from benchmarks.amused_vs_diffusers import SIZES
  from muse_jax.models.uvit import UVit2D

  # Layers unrolled, so that each one's ops are named (a scanned stack is one while loop).
  model = UVit2D(sample_size=16, dtype=jnp.dtype(dtype), scan_layers=False, **SIZES[size])
  ids = jnp.full((2, 16, 16), model.vocab_size - 1, jnp.int32)
  hidden = jnp.zeros((2, 77, model.encoder_hidden_size), jnp.float32)
  pooled = jnp.zeros((2, model.cond_embed_dim), jnp.float32)
  micro = jnp.tile(jnp.asarray([[256.0, 256.0, 0.0, 0.0, 6.0]]), (2, 1))
  params = jax.jit(lambda: model.init(jax.random.key(0), ids, hidden, pooled, micro)["params"])()
  params = jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, params)
  return lambda p: model.apply({"params": p}, ids, hidden, pooled, micro), (params,)


def vq_decode(dtype: str):
  """(function, args): aMUSEd's VQ decoder, random weights, one 16x16 grid of ids."""
  import jax.numpy as jnp

  from benchmarks.vq_speed import ours_from_state_dict

  model, params = ours_from_state_dict(None, dtype)
  ids = jnp.arange(256, dtype=jnp.int32).reshape(1, 16, 16)
  return lambda p: model.apply({"params": p}, ids, method=model.decode), (params,)


def op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{HLO instruction name: (output shape, op_name metadata)} of a compiled module."""
  info = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\((.*)$", hlo_text, re.M):
    name, shape, rest = m.groups()
    op_name = re.search(r'op_name="([^"]+)"', rest)
    info[name] = (shape, op_name.group(1) if op_name else "")
  return info


def module_path(op_name: str) -> str:
  """'jit(f)/jvp(Model)/blocks/layers_3/mlp/wi/dot_general' -> 'Model/blocks/layers/mlp/wi'."""
  parts = []
  for part in op_name.split("/")[:-1]:
    if part.startswith("jit(") or "while" in part:
      continue
    while (unwrapped := re.sub(r"^(?:jvp|transpose)\((.*)\)$", r"\1", part)) != part:
      part = unwrapped  # transpose(jvp(Model)) -> Model
    parts.append(_LAYER_INDEX.sub("", part))
  backward = "backward: " if "transpose(" in op_name else ""
  return backward + "/".join(p for p in parts if p)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--target",
    choices=("demo-step", "demo-vq-step", "uvit-mid", "uvit-full", "vq-decode"),
    required=True,
  )
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--top", type=int, default=15, help="rows of each table")
  args = parser.parse_args()

  import jax

  if args.target == "demo-step":
    fn, fn_args = demo_step(args.dtype)
  elif args.target == "demo-vq-step":
    fn, fn_args = demo_vq_step(args.dtype)
  elif args.target == "vq-decode":
    fn, fn_args = vq_decode(args.dtype)
  else:
    fn, fn_args = uvit_call(args.target.removeprefix("uvit-"), args.dtype)
  compiled = jax.jit(fn).lower(*fn_args).compile()
  jax.block_until_ready(compiled(*fn_args))
  start = time.perf_counter()
  for _ in range(REPEATS):
    jax.block_until_ready(compiled(*fn_args))
  wall = (time.perf_counter() - start) / REPEATS

  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    for _ in range(REPEATS):
      jax.block_until_ready(compiled(*fn_args))
    jax.profiler.stop_trace()
    (trace_file,) = pathlib.Path(folder).rglob("*.trace.json.gz")
    events = json.load(gzip.open(trace_file))["traceEvents"]

  info = op_metadata(compiled.as_text())
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not any(s in e["name"] for s in _SKIP):
      per_op[e["name"]] += e["dur"] / 1000 / REPEATS  # ms per call
  per_op = {k: v for k, v in per_op.items() if k in info}
  by_kind, by_module = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    is_dot = name.startswith(("ynn_fusion", "dot", "xnn_fusion")) or "dot" in info[name][1][-12:]
    by_kind["dot" if is_dot else re.sub(r"[.\d]+$", "", name)] += ms
    by_module[module_path(info[name][1]) or "(no module)"] += ms

  print(f"{args.target} in {args.dtype}: {wall * 1000:.1f} ms a call (wall), "
        f"{sum(per_op.values()):.1f} ms of op time")  # fmt: skip
  for title, table in (("op kind", by_kind), ("module", by_module)):
    print(f"\nby {title}:")
    for key, ms in table.most_common(args.top):
      print(f"  {ms:8.2f} ms  {key}")
  print("\nslowest ops:")
  for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
    shape, op_name = info[name]
    print(f"  {ms:8.2f} ms  {name:28s} {shape[:28]:28s} {module_path(op_name)}")


if __name__ == "__main__":
  main()
