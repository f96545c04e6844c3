r"""One 256x256 aMUSEd image, end to end: diffusers' AmusedPipeline vs ours, side by side.

Builds one random aMUSEd-architecture pipeline (no download): a U-ViT of the size
asked for, the real-size VQ (f = 16, 8192 codes) and a CLIP-L/14 text encoder with
projection, with the CLIP BPE tokenizer of the test fixtures (token ids only index
the embedding, so the cost is that of the real one). It is saved as a diffusers
folder with ``save_pretrained``, converted with ``muse_jax.convert.amused``, and
then both pipelines make the same request (one prompt, 12 steps, guidance 10 =
our t = 9, temperature 2 -> 0, cosine) ``--runs`` times, interleaved so that the
load of a shared machine hits both alike. Each side runs twice. Ours: with the U-ViT
in float32 (diffusers' precision) and in bfloat16 (bfloat16 products, float32 sums and
logits: the TPU's native matmul, and AVX512-BF16 / AMX units on CPUs that have them),
and its VQ decoder's products in the same dtype (``vq_convs.fast_convs``: Winograd on a
CPU, in float32 on one without bfloat16 units). Diffusers: in float32, and in bfloat16 on
a CPU with bfloat16 units (every module: oneDNN runs its products on the same units; not
on a CPU without them, where torch converts every operand and takes minutes an image) or
float16 on a GPU (its documented recipe for aMUSEd). Reported: the medians, each of ours
against diffusers in the same precision (and our bfloat16 against its float32, the
comparison of the earliest runs), and where the time goes in
each (text encoder, transformer steps, sampling arithmetic, VQ decode).

On a GPU (``--device cuda``) both sides may use TF32 in float32 matrix products (XLA's
default precision on the GPU; torch is told ``allow_tf32``), and the parts are timed in
wall seconds, synchronised.

Sizes (``--size``):
  mid:  U-ViT 512 wide, 8 layers, 8 heads, GEGLU 1408; the conv stages as amused-256
  full: amused-256 (1024 wide, 22 layers, 16 heads, GEGLU 2816)

Needs torch, diffusers and transformers (not the test suite's dependencies):

  python benchmarks/amused_vs_diffusers.py --size mid --runs 5
  python benchmarks/amused_vs_diffusers.py --size full --runs 3 --out /tmp/amused_full.json
  taskset -c 0 python benchmarks/amused_vs_diffusers.py --size mid   # one core each
  python benchmarks/amused_vs_diffusers.py --device cuda --size full --runs 10
  python benchmarks/amused_vs_diffusers.py --device cuda --size full --batch 32   # throughput

``--batch B`` makes every call B images of the one prompt (both sides batch them in one
model call per step) and adds images per second: throughput instead of latency.

On a CPU, glibc's malloc is set as the ``muse-jax`` command sets it (``muse_jax/host_memory.py``),
for both sides: the process is one. ``MUSE_JAX_MALLOC=default`` leaves it as it is.

On the CPU the breakdown counts CPU seconds (with one thread per side, as under `taskset -c 0`,
that is the work done, whatever else the machine runs). Diffusers' parts are timed
around its modules' calls; ours as separately compiled functions: the text encoder, the N
guided U-ViT calls (in one compiled loop, see ``ours_side``), the decode loop with fixed
logits in place of the U-ViT (the sampling arithmetic), and the VQ decode. The U-ViT
call's FLOPs (XLA's count, layers unrolled) and rate are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
  "mid": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408),
  "full": dict(),  # UVit2DModel's defaults are amused-256's
}
PROMPT = "a photograph of an astronaut riding a horse"
NUM_STEPS, GUIDANCE = 12, 10.0


# ---------------------------------------------------------------------------
# The random diffusers pipeline.


def build_diffusers_folder(size: str, folder: pathlib.Path) -> None:
  from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
  import torch
  import transformers

  torch.manual_seed(0)
  transformer = UVit2DModel(sample_size=16, **SIZES[size])
  vq_config = json.loads((ROOT / "tests" / "fixtures" / "vq" / "amused_256.json").read_text())
  vqvae = VQModel(**{k: v for k, v in vq_config["config"].items() if not k.startswith("_")})
  tokenizer = transformers.CLIPTokenizer.from_pretrained(
    ROOT / "tests" / "fixtures" / "text" / "pipeline" / "tokenizer"
  )
  clip = transformers.CLIPTextConfig(  # CLIP-L/14's text tower, as in aMUSEd
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=2,
    pad_token_id=tokenizer.pad_token_id,
  )
  text_encoder = transformers.CLIPTextModelWithProjection(clip)
  with torch.no_grad():  # diffusers zero-initialises some weights; make every one matter
    for module in (transformer, vqvae):
      for p in module.parameters():
        if p.numel() == 1 or float(p.std()) == 0.0:
          p.add_(0.02 * torch.randn(p.shape))
  pipe = AmusedPipeline(
    vqvae=vqvae.eval(),
    tokenizer=tokenizer,
    text_encoder=text_encoder.eval(),
    transformer=transformer.eval(),
    scheduler=AmusedScheduler(mask_token_id=8255),
  )
  pipe.save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------------------
# Timing helpers.


class Clock:
  """What the breakdown counts: CPU seconds of this process on the CPU, where the cores
  may be shared; wall seconds on a GPU, with torch's queue drained at each read (JAX's
  results are waited for by ``measure``)."""

  def __init__(self, device: str):
    self.device = device
    self.unit = "CPU seconds" if device == "cpu" else "wall seconds"

  def now(self) -> float:
    if self.device == "cpu":
      return time.process_time()
    sys.modules["torch"].cuda.synchronize()
    return time.perf_counter()

  def measure(self, fn, *args) -> float:
    t = self.now()
    jax_ready(fn(*args))
    return self.now() - t


class Timers:
  """Accumulates ``clock`` seconds per name while patched callables run."""

  def __init__(self, clock: Clock):
    self.clock = clock
    self.total: dict[str, float] = {}

  @contextlib.contextmanager
  def patch(self, obj, attr: str, name: str):
    real = getattr(obj, attr)

    def timed(*args, **kwargs):
      t = self.clock.now()
      try:
        return real(*args, **kwargs)
      finally:
        self.total[name] = self.total.get(name, 0.0) + self.clock.now() - t

    setattr(obj, attr, timed)
    try:
      yield
    finally:
      setattr(obj, attr, real)


def timed(fn, *args) -> float:
  t = time.perf_counter()
  fn(*args)
  return time.perf_counter() - t


def jax_ready(x):
  if "jax" in sys.modules:
    sys.modules["jax"].block_until_ready(x)
  return x


def timed_cpu(fn, *args) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process) of one call."""
  t, c = time.perf_counter(), time.process_time()
  fn(*args)
  return time.perf_counter() - t, time.process_time() - c


# ---------------------------------------------------------------------------
# The two sides.


def diffusers_side(folder: pathlib.Path, dtype: str, clock: Clock, batch: int):
  from diffusers import AmusedPipeline
  import torch

  torch.set_grad_enabled(False)
  pipe = AmusedPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
  pipe = pipe.to(clock.device)
  pipe.set_progress_bar_config(disable=True)

  def run(seed: int) -> np.ndarray:
    return pipe(
      PROMPT,
      num_images_per_prompt=batch,
      num_inference_steps=NUM_STEPS,
      guidance_scale=GUIDANCE,
      # On the pipeline's device: a CPU generator would send each step's probabilities
      # (256 x 8192) to the host for torch.multinomial.
      generator=torch.Generator(clock.device).manual_seed(seed),
      output_type="np",
    ).images

  def breakdown(seed: int) -> dict[str, float]:
    timers = Timers(clock)
    with contextlib.ExitStack() as stack:
      stack.enter_context(timers.patch(pipe.text_encoder, "forward", "text"))
      stack.enter_context(timers.patch(pipe.transformer, "forward", "transformer steps"))
      stack.enter_context(timers.patch(pipe.scheduler, "step", "sampling arithmetic"))
      stack.enter_context(timers.patch(pipe.vqvae, "decode", "VQ decode"))
      total = clock.measure(run, seed)
    parts = dict(timers.total)
    parts["other"] = total - sum(parts.values())
    return {"total": total, **parts}

  return run, breakdown


def guided_call_flops(stage, ids, text, negative, scale: float) -> float:
  """XLA's FLOP count of one guided U-ViT call, from the program lowered for the CPU.

  Counted on an unrolled copy of the model with XLA's attention: XLA counts the body of a
  scanned layer stack once, which leaves out 7 of the mid size's 8 layers (64 GFLOP counted
  instead of 95).

  Lowered for the CPU whatever the device: the GPU client counts nothing before compiling,
  and its compiled count leaves out the matrix products handed to cuBLAS (33 GFLOP for 95
  at mid size on an H200).
  """
  import dataclasses

  import jax

  from muse_jax import partitioning, sampling
  from muse_jax import text as text_lib

  # The einsum attention: cuDNN's (``uvit.fast_attention`` on a GPU) has no CPU lowering, and
  # fused or not, attention does the same multiplications.
  model = stage.model.clone(scan_layers=False, attention_implementation=None)
  unrolled = dataclasses.replace(stage, model=model)
  abstract = partitioning.unbox_abstract(unrolled.abstract_params())

  def call(params, ids, text, negative):
    both = text_lib.concatenate([text, negative])
    return sampling.guided_logits(lambda x: unrolled.logits(params, x, both), ids, scale)

  # On the CPU client: it counts the lowered program (the GPU one would raise).
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), (abstract, ids, text, negative)
  )
  lowered = jax.jit(call).lower(*shapes)
  cost = lowered.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def ours_side(loaded, dtype: str, clock: Clock, batch: int):
  """Our pipeline with the U-ViT computing in ``dtype`` (the other parts as loaded)."""
  import copy
  import dataclasses

  import jax
  import jax.numpy as jnp

  from muse_jax import amused, sampling
  from muse_jax import text as text_lib
  from muse_jax.models import uvit
  from muse_jax.models.vq_convs import fast_convs

  pipe = copy.copy(loaded)
  # As a run converted with `--dtype` loads: the kernels cast once, not in every call.
  pipe.base_stage = loaded.base_stage.with_dtype(dtype)
  pipe.base_params = uvit.cast_kernels(loaded.base_params, dtype)
  # ... and its VQ's products in that dtype (Winograd convolutions on a CPU).
  pipe.tokenizer = loaded.tokenizer.with_convs(**fast_convs(dtype))
  vq = pipe.tokenizer.model
  print(
    f"ours {dtype}: VQ convolutions by {vq.conv_impl}, products in {jnp.dtype(vq.conv_dtype or vq.dtype)}"
  )
  options = pipe.base_options  # the converted run's: aMUSEd's preset
  assert options == amused.AMUSED_SAMPLER, options
  assert options.guidance_scale == amused.guidance_from_diffusers(GUIDANCE)

  def run(seed: int) -> np.ndarray:
    return pipe.generate([PROMPT], seed=seed, num_images_per_prompt=batch)

  stage, params = pipe.base_stage, pipe.base_params

  @jax.jit
  def transformer_steps(params, ids, text, negative):
    """The decode's N guided U-ViT calls in one loop, without the sampling arithmetic.

    Timed as a loop, not as one call compiled on its own: inside a loop XLA casts the
    weights to the compute dtype once, and a lone call paid 20-50% more CPU time.
    """
    both = text_lib.concatenate([text, negative])
    logits_fn = lambda x: stage.logits(params, x, both)
    scale = jnp.float32(options.guidance_scale)

    def body(_, total):
      # The ids depend on the carry, so that XLA cannot hoist the call out of the loop.
      x = jnp.where(total > jnp.inf, 0, ids)
      return total + sampling.guided_logits(logits_fn, x, scale)[0, 0, 0]

    return jax.lax.fori_loop(0, NUM_STEPS, body, jnp.float32(0.0))

  @jax.jit
  def sampling_steps(logits, ids, rng):
    """The decode loop with each guided U-ViT call replaced by fixed logits: what the
    sampler itself costs (guidance, token draws, confidences, re-masking)."""
    fn = lambda x: logits[: x.shape[0]] + (x[..., None] == 0)  # depends on the ids
    # SamplerOptions' fields are sampling.decode's keyword arguments.
    return sampling.decode(ids, fn, rng, mask_id=stage.mask_id, **dataclasses.asdict(options)).ids

  def breakdown(seed: int) -> dict[str, float]:
    parts = {}
    prompts = [PROMPT] * batch
    parts["text"] = clock.measure(pipe.encode_prompts, prompts, None, True)
    text, negative = pipe.encode_prompts(prompts, None, guided=True)
    ids = jnp.full((batch, 256), stage.mask_id, jnp.int32)
    jax_ready(transformer_steps(params, ids, text, negative))  # compiled once
    steps = min(clock.measure(transformer_steps, params, ids, text, negative) for _ in range(3))
    cpu = "CPU-" if clock.device == "cpu" else ""
    rate = f"{steps / NUM_STEPS * 1e3:.1f} {cpu}ms in the loop"
    try:  # the count is only for the rate: a backend that cannot give it costs the rate alone
      flops = guided_call_flops(stage, ids, text, negative, options.guidance_scale)
      rate = f"{flops / 1e9:.1f} GFLOP, {rate}, {flops * NUM_STEPS / steps / 1e9:.0f} GFLOP per {cpu}second"
    except Exception as e:
      rate += f" (FLOPs not counted: {type(e).__name__}: {e})"
    print(f"one guided U-ViT call in {stage.model.dtype.name}: {rate}")
    parts["transformer steps"] = steps
    logits = jax.random.normal(jax.random.key(seed), (2 * batch, ids.shape[1], stage.codebook_size))
    rng = jax.random.key(seed)
    jax_ready(sampling_steps(logits, ids, rng))  # compiled once
    parts["sampling arithmetic"] = min(
      clock.measure(sampling_steps, logits, ids, rng) for _ in range(3)
    )
    tokens, _ = jax_ready(pipe.generate_tokens([PROMPT], seed=seed, num_images_per_prompt=batch))
    parts["VQ decode"] = clock.measure(pipe.tokenizer.decode, tokens.reshape(-1, *stage.grid))
    total = clock.measure(run, seed)
    parts["other"] = max(total - sum(parts.values()), 0.0)
    return {"total": total, **parts}

  return run, breakdown


# ---------------------------------------------------------------------------


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="mid")
  parser.add_argument("--runs", type=int, default=5, help="timed runs per side (after one warm-up)")
  parser.add_argument("--workdir", default=None, help="keep the folders here (default: a temp dir)")
  parser.add_argument("--out", default=None, help="also write the figures as JSON here")
  parser.add_argument(
    "--device", choices=("cpu", "cuda"), default="cpu", help="where both pipelines run"
  )
  parser.add_argument(
    "--batch", type=int, default=1, help="images per call (one prompt): throughput, not latency"
  )
  args = parser.parse_args()
  if args.batch < 1:
    parser.error(f"--batch must be at least 1; got {args.batch}")

  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # As the `muse-jax` command does: freed blocks are kept for the next call, which both
    # sides of this one process then share (MUSE_JAX_MALLOC=default to measure without).
    from muse_jax import host_memory

    host_memory.reuse_freed_memory()
  else:  # JAX takes GPU memory as it goes, leaving torch its share; the CPU counts FLOPs
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  import torch

  # Both sides use the cores this process may run on (`taskset -c 0` for one core:
  # on a machine shared with other jobs, one thread per side is the fairer match).
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  # XLA's default precision multiplies float32 in TF32 on the GPU; let torch do the same.
  torch.backends.cuda.matmul.allow_tf32 = True
  clock = Clock(args.device)

  from muse_jax import cpu_features, runs
  from muse_jax.convert.amused import convert_amused

  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="amused_bench_"))
  src, run_dir = workdir / f"diffusers_{args.size}", workdir / f"run_{args.size}"
  if not (src / "model_index.json").is_file():
    t = time.perf_counter()
    build_diffusers_folder(args.size, src)
    print(f"built the random diffusers folder in {time.perf_counter() - t:.1f} s: {src}")
  t = time.perf_counter()
  convert_amused(src, run_dir)
  print(f"converted (or found converted) in {time.perf_counter() - t:.1f} s: {run_dir}")

  t = time.perf_counter()
  loaded = runs.load_pipeline(run_dir)
  print(f"loaded ours in {time.perf_counter() - t:.1f} s")
  # Each of ours against diffusers in the same precision: float32 against float32, and our
  # bfloat16 against its bfloat16 on a CPU (oneDNN runs torch's bfloat16 products on
  # AVX512-BF16 and AMX units) or its float16 on a GPU (its documented recipe). Our bfloat16
  # against its float32 is printed too, as the comparison of earlier runs.
  # A CPU without bfloat16 units (AVX2 alone, say) has torch convert every operand: its
  # bfloat16 VQ decode took minutes on 2 Zen 3 cores, so it is not a setting anyone uses.
  halves = ["bfloat16"] if args.device == "cpu" else ["float16"]
  if cpu_features.converts_bf16(jax.devices()[0]):
    print("this CPU has no bfloat16 units (cpu_features): diffusers runs in float32 only")
    halves = []
  sides = {
    f"diffusers {d}": diffusers_side(src, d, clock, args.batch) for d in ("float32", *halves)
  }
  pairs = [
    ("ours float32", "diffusers float32"),
    *(("ours bfloat16", f"diffusers {half}") for half in halves),
    ("ours bfloat16", "diffusers float32"),
  ]
  for dtype in ("float32", "bfloat16"):
    sides[f"ours {dtype}"] = ours_side(loaded, dtype, clock, args.batch)
  names = list(sides)
  for name in names:  # warm-up: compiles ours, first-call costs of torch
    print(f"first call of {name}: {timed(sides[name][0], 0):.1f} s (compilation included)")

  times: dict[str, list[float]] = {name: [] for name in names}
  cpu: dict[str, list[float]] = {name: [] for name in names}
  for r in range(args.runs):
    for name in names:
      wall, used = timed_cpu(sides[name][0], r + 1)
      times[name].append(wall)
      cpu[name].append(used)
    print(f"run {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names))
  medians = {n: statistics.median(v) for n, v in times.items()}
  cpu_medians = {n: statistics.median(v) for n, v in cpu.items()}
  parts = {n: sides[n][1](99) for n in names}

  images = "one 256x256 image" if args.batch == 1 else f"{args.batch} 256x256 images a call"
  where = f"{os.cpu_count()} CPUs, {jax.devices()[0].device_kind}"
  if args.device == "cuda":
    where += f" (torch sees {torch.cuda.get_device_name()})"
  print(
    f"\naMUSEd {args.size}, {images}, {NUM_STEPS} steps, guidance {GUIDANCE:g}; "
    f"{where}; jax {jax.__version__}, torch {torch.__version__} with "
    f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at the end"
  )
  width = max(16, *(len(n) + 2 for n in names))
  print(f"{'':22s}" + "".join(f"{n:>{width}s}" for n in names))

  def row(label: str, seconds: dict[str, float]) -> None:
    print(f"{label:22s}" + "".join(f"{seconds[n]:>{width - 1}.3f}s" for n in names))

  row(f"median of {args.runs}", medians)
  if args.batch > 1:
    print(
      f"{'  images per second':22s}"
      + "".join(f"{args.batch / medians[n]:>{width}.2f}" for n in names)
    )
  row("  its CPU time", cpu_medians)
  print(f"one more run, {clock.unit} by part:")
  for part in ("text", "transformer steps", "sampling arithmetic", "VQ decode", "other", "total"):
    row(f"  {part}", {n: parts[n].get(part, 0.0) for n in names})
  ratios = {f"{ours} / {theirs}": medians[theirs] / medians[ours] for ours, theirs in pairs}
  for (ours, theirs), ratio in zip(pairs, ratios.values()):
    print(f"speed-up of {ours} (median {theirs} / median {ours}): {ratio:.2f}x")
  if args.out:
    pathlib.Path(args.out).write_text(
      json.dumps(
        {
          "size": args.size,
          "batch": args.batch,
          "device": where,
          "threads": torch.get_num_threads(),
          "runs": times,
          "cpu_seconds": cpu,
          "medians": medians,
          "ratios": ratios,
          "parts": parts,
        },
        indent=2,
      )
    )


if __name__ == "__main__":
  main()
