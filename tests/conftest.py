"""Test set-up: 8 fake CPU devices, a persistent compilation cache, fast compiles.

The environment must be set before jax is imported anywhere, so this file does it at
import time (pytest imports conftest.py before any test module).
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are tiny: XLA's expensive optimisation passes cost more than they save.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# A persistent compilation cache, set through the environment so that the commands the
# tests run as subprocesses share it.
_CACHE = pathlib.Path(
  os.environ.get("MUSE_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "muse_jax_tests")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, f"tests expect 8 fake CPU devices; jax sees {jax.device_count()}"
