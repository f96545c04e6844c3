"""The host CPU's bfloat16 units, read from /proc/cpuinfo text."""

import types

from muse_jax import cpu_features

_ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2
"""
_SAPPHIRE_RAPIDS = """processor\t: 0
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
_NEOVERSE_V1 = """processor\t: 0
Features\t: fp asimd evtstrm aes sha2 crc32 atomics fphp asimdhp bf16 i8mm sve
"""


def test_bf16_flags():
  assert cpu_features.bf16_flags(_ZEN3) == frozenset()
  assert cpu_features.bf16_flags(_SAPPHIRE_RAPIDS) == {"avx512_bf16", "amx_bf16"}
  assert cpu_features.bf16_flags(_NEOVERSE_V1) == {"bf16"}
  assert cpu_features.bf16_flags("") == frozenset()


def test_has_bf16_products(tmp_path):
  for text, expected in ((_ZEN3, False), (_SAPPHIRE_RAPIDS, True), (_NEOVERSE_V1, True)):
    path = tmp_path / f"cpuinfo_{expected}_{len(text)}"
    path.write_text(text)
    assert cpu_features.has_bf16_products(str(path)) is expected
  assert cpu_features.has_bf16_products(str(tmp_path / "missing")) is False


def test_converts_bf16_only_on_a_cpu_without_units(monkeypatch):
  cpu, gpu = types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="gpu")
  for units in (True, False):
    monkeypatch.setattr(cpu_features, "has_bf16_products", lambda u=units: u)
    assert cpu_features.converts_bf16(cpu) is not units
    assert cpu_features.converts_bf16(gpu) is False
