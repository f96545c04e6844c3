"""host_memory: the CPU-only test, and freed XLA temporaries reused instead of faulted in."""

import json
import os
import subprocess
import sys

import pytest

from muse_jax import host_memory

# A program whose temporaries make one block of 128 MiB ([8192, 4096] float32 between two
# products), run 5 times after a first call; prints the page faults of those 5 calls.
_PROBE = """
import json, resource, sys
from muse_jax import host_memory
reused = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: (jnp.tanh(x @ w) @ w.T).sum())
x, w = jnp.ones((8192, 16)), jnp.ones((16, 4096)) / 64
f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x, w).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"reused": reused, "faults_per_call": (after - before) / 5}))
"""


def test_cpu_only_follows_jax_platforms():
  assert host_memory.cpu_only({"JAX_PLATFORMS": "cpu"})
  assert not host_memory.cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
  assert not host_memory.cpu_only({"JAX_PLATFORMS": "tpu"})


def test_opt_out_and_accelerators_leave_malloc_alone():
  assert not host_memory.reuse_freed_memory({"JAX_PLATFORMS": "cpu", "MUSE_JAX_MALLOC": "default"})
  assert not host_memory.reuse_freed_memory({"JAX_PLATFORMS": "cuda"})


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc is what is set")
def test_freed_temporaries_are_reused():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MUSE_JAX_MALLOC")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True, timeout=120
  )
  probe = json.loads(out.stdout.strip().splitlines()[-1])
  assert probe["reused"], "mallopt was not applied on a CPU-only Linux host"
  # Faulted in afresh, the 128 MiB block alone is 32,768 pages of 4 KiB a call.
  assert probe["faults_per_call"] < 3000, probe
