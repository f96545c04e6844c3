"""On a CPU-only host, keep the memory XLA frees for its next call instead of returning it.

XLA's CPU client gives each call of a compiled program one block for all its temporaries
(162 MB for a step of the demo's base), allocated with ``malloc`` on one of its worker
threads. glibc gives every such thread its own arena, and an arena other than the main one
cannot hold a block over 64 MB: it ``mmap``s it, and ``munmap``s it when it is freed. So
every call faults the whole block in again, 4 KiB at a time, and the kernel zeroes each
page: 41,600 page faults and ~63 ms of system time in every 106 ms step of the demo's base
on 2 Intel Xeon cores (2026-12-07), a quarter of the demo's CPU time.

With one arena, no ``mmap`` and no trimming, a freed block stays in the process's heap and
the next call reuses it: 1,400 faults, 6 ms of system time, 86-88 ms a step. The price is
that the process keeps its peak heap until it exits, and that its threads share one
arena's lock, which costs nothing on a few cores and could on a host with hundreds, so
this is done only where JAX can use nothing but the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def cpu_only(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether JAX will run on the CPU alone, decided without importing it.

  ``JAX_PLATFORMS`` decides when it is set; otherwise JAX uses an accelerator only through a
  plugin (``jax_plugins`` entry points or namespace modules, CUDA or ROCm) or ``libtpu``.
  """
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return {p.strip() for p in platforms.split(",")} <= {"cpu"}
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return not any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


def reuse_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
  """Sets glibc's malloc to keep freed blocks (see the module's docstring) on a CPU-only
  host; returns whether it did. Call it before JAX starts its threads: a thread keeps the
  arena of its first ``malloc``. A no-op elsewhere (not Linux, not glibc, an accelerator)
  and where ``MUSE_JAX_MALLOC=default``.
  """
  if sys.platform != "linux" or environ.get("MUSE_JAX_MALLOC") == "default":
    return False
  if not cpu_only(environ):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other C libraries have no mallopt
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(mallopt(param, value) == 1 for param, value in settings)
