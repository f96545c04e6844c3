"""T5 encoder: bucket arithmetic, parity with transformers, masking, bf16, T5-XXL sharding."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import text_encoders
from muse_jax.convert.hf_text import load_params, module_from_config, open_text_checkpoint
from muse_jax.models.t5 import relative_position_bucket
from muse_jax.partitioning import DEFAULT_RULES, logical_shardings, make_mesh, unbox_abstract


def test_relative_position_bucket_matches_hand_computed_values():
  # Bidirectional, 32 buckets, max distance 128: 16 buckets per direction, 8 exact ones.
  # Keys to the left (negative offsets) use buckets 0..15, to the right 16..31.
  # From distance 8 on: 8 + floor(log(distance / 8) / log(128 / 8) * 8), at most 15.
  offsets = np.array([0, -1, 1, -7, 7, -8, 8, -12, -16, -32, -127, -128, -1000, 1000])
  expected = np.array([0, 1, 17, 7, 23, 8, 24, 9, 10, 12, 15, 15, 15, 31])
  got = relative_position_bucket(
    jnp.asarray(offsets), bidirectional=True, num_buckets=32, max_distance=128
  )
  np.testing.assert_array_equal(got, expected)


def test_relative_position_bucket_causal_and_monotone():
  offsets = jnp.arange(-300, 301)
  causal = np.asarray(
    relative_position_bucket(offsets, bidirectional=False, num_buckets=32, max_distance=128)
  )
  assert (causal[offsets > 0] == 0).all()  # the future is never attended in a decoder.
  left = causal[::-1][300:]  # distances 0, 1, 2, ... to the left.
  assert (np.diff(left) >= 0).all() and left[0] == 0 and left.max() == 31
  bidi = np.asarray(relative_position_bucket(offsets, num_buckets=8, max_distance=12))
  assert bidi.min() == 0 and bidi.max() == 7


@pytest.fixture(scope="module", params=["t5_v1_1", "t5"])
def t5(request, fixtures_dir):
  """(name, module, params, golden, jitted apply) for each fixture folder."""
  checkpoint = open_text_checkpoint(fixtures_dir / "text" / request.param)
  params = load_params(checkpoint)
  golden = dict(np.load(fixtures_dir / "text" / f"golden_{request.param}.npz"))
  apply = jax.jit(lambda p, ids, mask: checkpoint.module.apply({"params": p}, ids, mask))
  return request.param, checkpoint, params, golden, apply


def test_matches_transformers(t5):
  name, checkpoint, params, golden, apply = t5
  assert checkpoint.module.gated == (name == "t5_v1_1")
  out = apply(params, golden["input_ids"], golden["attention_mask"])
  np.testing.assert_allclose(out, golden["last_hidden_state"], atol=1e-4, rtol=1e-4)


def test_padding_does_not_change_real_tokens(t5):
  # Positions attend only to real tokens and the bias depends on offsets alone, so a
  # shorter padded length gives the same states at the real positions.
  _, _, params, golden, apply = t5
  short = golden["attention_mask"].sum(1) <= 16
  ids, mask = golden["input_ids"][short, :16], golden["attention_mask"][short, :16]
  out = np.asarray(apply(params, ids, mask))
  ref = golden["last_hidden_state"][short, :16]
  np.testing.assert_allclose(out[mask], ref[mask], atol=1e-4, rtol=1e-4)
  # ...whereas dropping the mask lets the padding in and changes them.
  unmasked = np.asarray(apply(params, ids, np.ones_like(mask)))
  assert np.abs(unmasked[mask] - ref[mask]).max() > 1e-2


def test_bfloat16_is_close_to_float32(fixtures_dir):
  checkpoint = open_text_checkpoint(fixtures_dir / "text" / "t5_v1_1", dtype=jnp.bfloat16)
  params = load_params(checkpoint)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  golden = np.load(fixtures_dir / "text" / "golden_t5_v1_1.npz")
  out = checkpoint.module.apply({"params": params}, golden["input_ids"], golden["attention_mask"])
  assert out.dtype == jnp.bfloat16
  ref = golden["last_hidden_state"]
  error = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
  assert error < 0.03, error


def test_t5_xxl_parameter_count_and_sharding():
  config = text_encoders.get_config("t5_v1_1_xxl")
  module = module_from_config(config.hf_config.to_dict(), jnp.bfloat16)
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), ids, jnp.ones((1, 8), bool))["params"]
  leaves = jax.tree.leaves(unbox_abstract(abstract))
  d, f, layers = 4096, 10240, 24
  per_layer = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o; wi_0, wi_1, wo; two norms.
  expected = 32128 * d + layers * per_layer + 32 * 64 + d  # + position buckets x heads, final norm.
  total = sum(math.prod(x.shape) for x in leaves)
  assert total == expected and 4.76e9 < total < 4.77e9

  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)

  def spec(*path):
    tree = shardings
    for key in path:
      tree = tree[key]
    return tree.spec

  # Big matrices: the model width on fsdp, heads / MLP width / vocabulary on tensor.
  assert spec("blocks", "mlp", "wi_0") == P(None, "fsdp", "tensor")
  assert spec("blocks", "mlp", "wo") == P(None, "tensor", "fsdp")
  assert spec("blocks", "attention", "query") == P(None, "fsdp", "tensor", None)
  assert spec("blocks", "attention", "out") == P(None, "tensor", None, "fsdp")
  assert spec("embedding") == P("tensor", "fsdp")
  # Every device holds 1/8 of the model, up to the replicated norms and position bias.
  per_device = sum(
    math.prod(s.shard_shape(x.shape))
    for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
  )
  assert per_device < 1.001 * total / 8
