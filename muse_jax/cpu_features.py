"""Whether the host CPU multiplies bfloat16 in hardware, read from ``/proc/cpuinfo``.

XLA's CPU backend (and torch's oneDNN) run bfloat16 matrix products on AVX512-BF16 or AMX
units on x86 and on the BF16 extension on Arm. A CPU without them converts every operand to
float32 first, so bfloat16 products there only add work: aMUSEd's VQ decoder with Winograd
convolutions on 2 AMD Zen 3 cores (AVX2, 2026-12-07; ``benchmarks/vq_speed.py --no_torch
--conv_impl winograd --conv_dtype ...``) took 2.49 s with float32 products and 2.91 s with
bfloat16 ones, and torch's bfloat16 convolutions there took minutes.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

# /proc/cpuinfo's names for bfloat16 multiply units: x86's "flags", aarch64's "Features".
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def bf16_flags(cpuinfo: str) -> frozenset[str]:
  """The bfloat16 flags named on the first flags (x86) or Features (aarch64) line."""
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return BF16_FLAGS.intersection(value.split())
  return frozenset()


@functools.cache
def has_bf16_products(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
  """Whether this host's CPU has bfloat16 multiply units; False where it cannot be read."""
  try:
    text = pathlib.Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
  except OSError:  # not Linux: assume none, float32 is never slower where they are missing
    return False
  return bool(bf16_flags(text))


def converts_bf16(device: Any) -> bool:
  """Whether ``device`` (a ``jax.Device``) is a CPU that converts bfloat16 operands to
  float32 before it multiplies: there float32 is the faster compute dtype."""
  return device.platform == "cpu" and not has_bf16_products()
