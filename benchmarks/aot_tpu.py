"""Ahead-of-time compile of the Muse train steps for TPU pods, on this CPU host.

XLA's TPU compiler (libtpu) can compile for a topology without the hardware:
``jax.experimental.topologies.get_topology_desc`` describes e.g. a v4 slice of 64 or
512 chips, the train step is lowered with the trainer's own shardings over a mesh of
those (virtual) devices, and the compiled program reports

* ``memory_analysis()``: per-device bytes of arguments, outputs (minus donated
  aliases) and temporaries, i.e. the HBM the step needs, against the chip's HBM;
* ``cost_analysis()``: XLA's own estimate of the step time (``optimal_seconds``) and
  FLOPs, hence an estimated model FLOPs utilisation (MFU) = model FLOPs / step time /
  (peak FLOP/s x chips).

The memory figures come from the real configs (scanned layers, remat, bf16 compute).
XLA's cost model does not see through the scanned (while-loop) layers, so the step
time is estimated from unrolled 1- and 2-layer variants, extrapolated linearly to the
real depth (``--cost extrapolated``, the default; ``--cost scanned`` reports the raw
estimate of the scanned program).

Needs libtpu matching jax. It is kept out of the shared environment (an installed
libtpu makes every jax start on this host probe for TPUs); install it aside once:

  pip install --no-deps --target ~/.cache/muse_jax/libtpu 'libtpu==0.0.42.1'  # jax[tpu]==0.10.2's
  python benchmarks/aot_tpu.py                      # Muse-3B and super-res, v4 64 and 512 chips
  python benchmarks/aot_tpu.py --models muse_base_3b --chips 512 --batch 512 --cost scanned

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

ROOT = pathlib.Path(__file__).resolve().parents[1]
V4_HBM_BYTES = 32 * 2**30  # per chip
V4_PEAK_FLOPS = 275e12  # bf16 per chip
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
  sys.path.insert(0, str(ROOT))


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


@dataclasses.dataclass
class Result:
  model: str
  chips: int
  batch: int
  params_b: float
  hbm_gib: float  # per device: arguments + outputs - aliased + temporaries
  state_gib: float  # per device: the train state (arguments)
  temp_gib: float
  fits: bool
  step_s: float | None
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
  step_s = mfu = None
  if cost != "none":
    step_s, extra_s = estimate_step_seconds(model_name, batch, devices, cost)
    compile_s += extra_s
    if step_s and step_s > 0:
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
    step_s=step_s,
    mfu=mfu,
    compile_s=compile_s,
  )


def _optimal_seconds(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis.get("optimal_seconds", float("nan")))


def estimate_step_seconds(
  model_name: str, batch: int, devices, cost: str
) -> tuple[float | None, float]:
  """XLA's step-time estimate; ``extrapolated`` fits it linearly in the layer counts.

  Layers are identical, so the estimate is a + b * layers (per layer kind). Compiling
  1- and 2-layer unrolled variants gives a and b exactly, without compiling 48
  unrolled layers; ``scanned`` reports the estimate of the scanned program as is.
  """
  if cost == "scanned":
    compiled, seconds, _, _ = compile_step(_config(model_name, batch), devices, unrolled=False)
    return _optimal_seconds(compiled), seconds
  full = _config(model_name, batch).model
  kinds = ["num_layers"] + (["num_low_layers"] if full.kind == "superres" else [])
  variants = [dict.fromkeys(kinds, 1)] + [dict(dict.fromkeys(kinds, 1), **{k: 2}) for k in kinds]
  estimates, total = [], 0.0
  for layers in variants:
    config = _config(model_name, batch)
    config.model.update(layers)
    compiled, seconds, _, _ = compile_step(config, devices, unrolled=True)
    estimates.append(_optimal_seconds(compiled))
    total += seconds
  base = estimates[0]
  per_layer = {k: estimates[i + 1] - base for i, k in enumerate(kinds)}
  return base + sum(per_layer[k] * (full[k] - 1) for k in kinds), total


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
    choices=("extrapolated", "scanned", "none"),
    default="extrapolated",
    help="step-time estimate",
  )
  parser.add_argument(
    "--libtpu_dir",
    default="~/.cache/muse_jax/libtpu",
    help="where libtpu was pip-installed with --target",
  )
  args = parser.parse_args()
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

  header = f"{'model':<20} {'chips':>5} {'batch':>5} {'params':>7} {'HBM/dev GiB':>11} {'state':>6} {'temp':>6} {'fits 32G':>8} {'step s':>7} {'MFU':>6} {'compile s':>9}"
  print(header)
  for name in args.models.split(","):
    for chips in chip_counts:
      r = run(name, chips, args.batch, args.cost)
      step = f"{r.step_s:.3f}" if r.step_s else "-"
      mfu = f"{100 * r.mfu:.1f}%" if r.mfu else "-"
      print(
        f"{r.model:<20} {r.chips:>5} {r.batch:>5} {r.params_b:>6.2f}B {r.hbm_gib:>11.2f} {r.state_gib:>6.2f} "
        f"{r.temp_gib:>6.2f} {'yes' if r.fits else 'NO':>8} {step:>7} {mfu:>6} {r.compile_s:>9.1f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
