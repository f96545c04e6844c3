"""Speed of the compiled decode loop against the same algorithm driven from Python.

`sampling.decode` runs all N steps inside one XLA program (`lax.fori_loop`). The
baseline runs the identical step function (guided logits + `unmask_step`) as one
jitted call per step from a Python loop, as the PyTorch peers do. With a cheap
logits_fn the difference is the per-step host overhead: dispatch, and the host
round trip that a Python loop invites.

    python benchmarks/decode_loop.py --batch 8 --length 256 --vocab 1024 --steps 24
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from muse_jax import sampling


def make_logits_fn(vocab: int, width: int, batch: int):
  """A cheap model: token embedding, mixed with a per-row conditioning, to logits."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  embed = jax.random.normal(k1, (vocab + 1, width)) / width**0.5
  out = jax.random.normal(k2, (width, vocab))
  cond = jax.random.normal(k3, (2 * batch, width))  # [conditional; unconditional]

  def logits_fn(ids):  # [B', L] -> [B', L, K]
    h = embed[ids] + cond[: ids.shape[0], None, :]
    return jnp.einsum("BLD,DK->BLK", h, out)

  return logits_fn


def python_loop(
  init_ids, logits_fn, rng, *, mask_id, num_steps, guidance_scale, choice_temperature
):
  """The same algorithm as `sampling.decode`, one jitted call per step."""

  @jax.jit
  def step(ids, num_unknown_start, i, key):
    k_sample, k_choice = jax.random.split(key)
    t = sampling.guidance_at(i, num_steps, guidance_scale, "linear")
    logits = sampling.guided_logits(logits_fn, ids, t)
    num_to_mask = sampling.num_masked_after(
      i, num_steps, num_unknown_start, jnp.sum(ids == mask_id, -1, dtype=jnp.int32), "cosine"
    )
    tau = choice_temperature * (1.0 - (i + 1) / num_steps)
    return sampling.unmask_step(
      ids,
      logits,
      mask_id=mask_id,
      num_to_mask=num_to_mask,
      uniform=1.0 - jax.random.uniform(k_sample, ids.shape),
      gumbel=jax.random.gumbel(k_choice, ids.shape),
      choice_temperature=tau,
    )

  ids = init_ids
  n0 = jnp.sum(ids == mask_id, -1, dtype=jnp.int32)
  for i in range(num_steps):
    rng, key = jax.random.split(rng)
    ids = step(ids, n0, jnp.int32(i), key)
  return ids


def timed(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--steps", type=int, default=24)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  logits_fn = make_logits_fn(args.vocab, args.width, args.batch)
  mask_id = args.vocab
  init = jnp.full((args.batch, args.length), mask_id, jnp.int32)
  kw = dict(mask_id=mask_id, num_steps=args.steps, guidance_scale=3.0, choice_temperature=4.5)

  compiled = jax.jit(lambda key: sampling.decode(init, logits_fn, key, **kw).ids)
  t_loop = timed(lambda: compiled(jax.random.key(0)), args.repeats)
  t_python = timed(lambda: python_loop(init, logits_fn, jax.random.key(0), **kw), args.repeats)

  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  jax {jax.__version__}")
  print(
    f"B={args.batch} L={args.length} K={args.vocab} steps={args.steps} guidance on "
    f"(model batch {2 * args.batch}), median of {args.repeats}"
  )
  print(
    f"{'compiled loop (one XLA program)':<36} {t_loop * 1e3:9.1f} ms  {args.steps / t_loop:8.1f} steps/s"
  )
  print(
    f"{'python loop (one jit call per step)':<36} {t_python * 1e3:9.1f} ms  {args.steps / t_python:8.1f} steps/s"
  )
  print(f"speed-up of the compiled loop: {t_python / t_loop:.2f}x")


if __name__ == "__main__":
  main()
