"""Ahead-of-time compile of the Muse train steps for TPU pods, on this CPU host.

XLA's TPU compiler (libtpu) can compile for a topology without the hardware:
``jax.experimental.topologies.get_topology_desc`` describes e.g. a v4 slice of 64 or
512 chips, the train step is lowered with the trainer's own shardings over a mesh of
those (virtual) devices, and the compiled program reports

* ``memory_analysis()``: per-device bytes of arguments, outputs (minus donated
  aliases) and temporaries, i.e. the HBM the step needs, against the chip's HBM;
* ``cost_analysis()``: the FLOPs and HBM bytes the program executes per device.

Step time: XLA's own estimate (``optimal_seconds``) is unusable when compiling from a
CPU host against a topology description (libtpu 0.0.42.1 returns negative values that
grow with depth: -88, -182, -363 s for 1, 2, 4 layers of the 632M model on 8 chips).
The estimate here is a roofline from XLA's counts: max(FLOPs / peak, bytes / HBM
bandwidth) per device, a lower bound on the step time (it assumes perfect overlap and
ignores collectives), hence an upper bound on MFU = model FLOPs / step time /
(peak x chips). XLA's cost analysis does not see through the scanned (while-loop)
layers, so FLOPs and bytes come from unrolled 1- and 2-layer variants, extrapolated
linearly to the real depth (layers are identical, so this is exact up to fusion).
The memory figures come from the real configs (scanned layers, remat, bf16 compute).

Needs libtpu matching jax. It is kept out of the shared environment (an installed
libtpu makes every jax start on this host probe for TPUs); install it aside once:

  pip install --no-deps --target ~/.cache/muse_jax/libtpu 'libtpu==0.0.42.1'  # jax[tpu]==0.10.2's
  python benchmarks/aot_tpu.py                      # Muse-3B and super-res, v4 64 and 512 chips
  python benchmarks/aot_tpu.py --models muse_base_3b --chips 512 --batch 512 --cost none  # memory only
  python benchmarks/aot_tpu.py --models muse_superres_512 --chips 64 --set model.remat_policy=full

(`pip install 'jax[tpu]==0.10.2'` works too: then --libtpu_dir is not needed.)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
V4_HBM_BYTES = 32 * 2**30  # per chip
V4_PEAK_FLOPS = 275e12  # bf16 per chip
V4_HBM_BANDWIDTH = 1.2e12  # bytes/s per chip
# Chips -> v4 slice shape (x, y, z). Google names slices by TensorCores: v4-128 = 64 chips.
V4_SHAPES = {
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
}


def _setup_env(libtpu_dir: str | None, chips: int) -> None:
  if libtpu_dir:
    sys.path.insert(0, os.path.expanduser(libtpu_dir))
  # The host itself stays a CPU host; only the compiler targets the TPU topology.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"v4-{2 * chips}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles side by side
  sys.path.insert(0, str(ROOT))


OVERRIDES: dict[str, str] = {}  # --set key=value, applied to every config loaded


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  return config


@dataclasses.dataclass
class Result:
  model: str
  chips: int
  batch: int
  params_b: float
  hbm_gib: float  # per device: arguments + outputs - aliased + temporaries
  state_gib: float  # per device: the train state and batch (arguments)
  temp_gib: float
  fits: bool
  tflops: float | None  # XLA's FLOPs per device per step, in 1e12
  gbytes: float | None  # XLA's HBM bytes accessed per device per step, in 1e9
  step_s: float | None  # roofline: max(compute, memory) time
  mfu: float | None
  compile_s: float


def compile_step(config, devices, *, unrolled: bool):
  """Lowers and compiles the trainer's step for ``devices``; returns the compiled step."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from muse_jax import optim, partitioning
  from muse_jax.trainers import transformer as trainer

  if unrolled:
    config.model.scan_layers = False
  model = trainer.make_model(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  mesh = partitioning.make_mesh(dict(config.mesh.shape), devices)
  rules = partitioning.rules_from_config(config.mesh.rules)
  b, t, dt = config.train.batch_size, config.text.length, config.text.dim
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = trainer.state_shardings(config, tx, mesh, rules)
    state = trainer._with_shardings(abstract, shardings)
    batch_sh = trainer._batch_shardings(config, mesh)
    shapes = {
      "ids": ((b, model.length), jnp.int32),
      "text_emb": ((b, t, dt), jnp.bfloat16),  # pre-encoded shards store bf16
      "text_mask": ((b, t), jnp.bool_),
    }
    if trainer.is_superres(config):
      lh, lw = config.model.low_grid
      shapes["low_res_ids"] = ((b, lh * lw), jnp.int32)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh[k]) for k, (s, d) in shapes.items()}
    rep = partitioning.replicated(mesh)
    uncond = (
      jax.ShapeDtypeStruct((t, dt), jnp.float32, sharding=rep),
      jax.ShapeDtypeStruct((t,), jnp.bool_, sharding=rep),
    )
    step = jax.jit(
      trainer.make_train_step(config, model, tx, schedule),
      in_shardings=(shardings, batch_sh, rep, rep),
      out_shardings=(shardings, rep),
      donate_argnums=(0,),
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch, *uncond).compile()
    elapsed = time.perf_counter() - start
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  return compiled, elapsed, model, num_params


def run(model_name: str, chips: int, batch: int, cost: str) -> Result:
  from jax.experimental import topologies

  shape = V4_SHAPES[chips]
  topology = topologies.get_topology_desc(
    topology_name="v4:" + "x".join(map(str, shape)),
    platform="tpu",
    chip_config_name="megacore",  # one device per v4 chip, as real v4 jobs run
    chips_per_host_bounds=(2, 2, 1),
    num_slices=1,
    wrap=tuple(s >= 4 for s in shape),
  )
  devices = topology.devices
  config = _load_config(model_name)
  config.train.batch_size = batch
  compiled, compile_s, model, num_params = compile_step(config, devices, unrolled=False)
  mem = compiled.memory_analysis()
  state = mem.argument_size_in_bytes
  total = state + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  tflops = gbytes = step_s = mfu = None
  if cost != "none":
    flops, nbytes, extra_s = extrapolated_costs(model_name, batch, devices)
    compile_s += extra_s
    tflops, gbytes = flops / 1e12, nbytes / 1e9
    step_s = max(flops / V4_PEAK_FLOPS, nbytes / V4_HBM_BANDWIDTH)
    model_flops = 3 * model.forward_flops(config.text.length, config.text.dim) * batch
    mfu = model_flops / step_s / (V4_PEAK_FLOPS * len(devices))
  gib = 2.0**30
  return Result(
    model=model_name,
    chips=len(devices),
    batch=batch,
    params_b=num_params / 1e9,
    hbm_gib=total / gib,
    state_gib=state / gib,
    temp_gib=mem.temp_size_in_bytes / gib,
    fits=total <= V4_HBM_BYTES,
    tflops=tflops,
    gbytes=gbytes,
    step_s=step_s,
    mfu=mfu,
    compile_s=compile_s,
  )


def _costs(compiled) -> tuple[float, float]:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis["flops"]), float(analysis["bytes accessed"])


def extrapolated_costs(model_name: str, batch: int, devices) -> tuple[float, float, float]:
  """Per-device (FLOPs, bytes, compile seconds) of the full-depth step.

  Costs are a + b * layers per layer kind; unrolled 1- and 2-layer variants give a and
  b without compiling 48 unrolled layers.
  """
  full = _config(model_name, batch).model
  kinds = ["num_layers"] + (["num_low_layers"] if full.kind == "superres" else [])
  variants = [dict.fromkeys(kinds, 1)] + [dict(dict.fromkeys(kinds, 1), **{k: 2}) for k in kinds]
  costs, total = [], 0.0
  for layers in variants:
    config = _config(model_name, batch)
    config.model.update(layers)
    compiled, seconds, _, _ = compile_step(config, devices, unrolled=True)
    costs.append(np.asarray(_costs(compiled)))
    total += seconds
  base = costs[0]
  full_cost = base + sum((costs[i + 1] - base) * (full[k] - 1) for i, k in enumerate(kinds))
  return float(full_cost[0]), float(full_cost[1]), total


def _config(name: str, batch: int):
  config = _load_config(name)
  config.train.batch_size = batch
  return config


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--models", default="muse_base_3b,muse_superres_512", help="config names under configs/"
  )
  parser.add_argument(
    "--chips", default="64,512", help="v4 slice sizes in chips: " + ",".join(map(str, V4_SHAPES))
  )
  parser.add_argument("--batch", type=int, default=512, help="global batch (paper: 512)")
  parser.add_argument(
    "--cost",
    choices=("extrapolated", "none"),
    default="extrapolated",
    help="roofline step time from XLA's FLOPs / bytes (two or three extra small compiles)",
  )
  parser.add_argument(
    "--libtpu_dir",
    default="~/.cache/muse_jax/libtpu",
    help="where libtpu was pip-installed with --target",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    help="config override KEY=VALUE, e.g. --set model.remat_policy=full (repeatable)",
  )
  args = parser.parse_args()
  for item in args.set:
    key, _, value = item.partition("=")
    OVERRIDES[key] = value
  chip_counts = [int(c) for c in args.chips.split(",")]
  bad = [c for c in chip_counts if c not in V4_SHAPES]
  if bad:
    parser.error(f"--chips {bad} not among the known v4 slices {sorted(V4_SHAPES)}")
  _setup_env(args.libtpu_dir, max(chip_counts))
  try:
    import libtpu  # noqa: F401
  except ImportError:
    sys.exit(
      f"aot_tpu: libtpu is not importable (looked in {args.libtpu_dir} and site-packages); see the docstring"
    )

  columns = (
    f"{'model':<18} {'chips':>5} {'batch':>5} {'params':>7} {'HBM/dev':>8} {'state':>6} {'temp':>6} "
    f"{'fits 32G':>8} {'TFLOP/dev':>9} {'GB/dev':>7} {'step s':>7} {'MFU<=':>6} {'compile s':>9}"
  )
  print(columns)
  for name in args.models.split(","):
    for chips in chip_counts:
      r = run(name, chips, args.batch, args.cost)
      na = lambda v, f: "-" if v is None else format(v, f)
      print(
        f"{r.model:<18} {r.chips:>5} {r.batch:>5} {r.params_b:>6.2f}B {r.hbm_gib:>7.2f}G "
        f"{r.state_gib:>6.2f} {r.temp_gib:>6.2f} {'yes' if r.fits else 'NO':>8} "
        f"{na(r.tflops, '.2f'):>9} {na(r.gbytes, '.1f'):>7} {na(r.step_s, '.3f'):>7} "
        f"{na(r.mfu and 100 * r.mfu, '.1f'):>5}% {r.compile_s:>9.1f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
