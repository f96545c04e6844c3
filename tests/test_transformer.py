"""Muse transformers: sizes against the paper, golden partition specs, conditioning
invariants, FLOP count against XLA's, and the masked cross-entropy.
"""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_train_transformer import load_config

from muse_jax import losses
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer
from muse_jax.trainers import transformer as trainer


def _count(config) -> tuple[int, dict[str, int]]:
  params = jax.tree_util.tree_flatten_with_path(
    jax.tree.map(lambda x: x, trainer.partitioning.unbox_abstract(trainer.abstract_params(config)))
  )[0]
  by_module: dict[str, int] = {}
  for path, leaf in params:
    by_module[path[0].key] = by_module.get(path[0].key, 0) + math.prod(leaf.shape)
  return sum(by_module.values()), by_module


def _block_params(d, f, layers, cross=True):
  attn = 4 * d * d + 3 * d  # q, k, v, out kernels; q, v, out biases (no key bias)
  return layers * ((2 if cross else 1) * attn + 2 * d * f + f + d + (3 if cross else 2) * 2 * d)


@pytest.mark.parametrize(
  "name, paper, tolerance",
  [
    # Paper: "632M" and "3B" parameters (§4, Table 4 / 6). 632M: the blocks + text
    # projection are 635M; the token embedding and the output head add 23M more.
    ("muse_base_632m", 632e6, 0.05),
    # "3B" is a rounded figure; 48 x 2048 x 8192 blocks alone are 3.22B.
    ("muse_base_3b", 3.0e9, 0.10),
  ],
)
def test_base_parameter_counts(name, paper, tolerance):
  config = load_config(name, None)
  total, by_module = _count(config)
  m = config.model
  assert by_module["blocks"] == _block_params(m.width, m.mlp_dim, m.num_layers)
  assert by_module["text_proj"] == config.text.dim * m.width + 3 * m.width
  assert (
    by_module["head"] == m.width * m.width + m.width * m.vocab_size + m.vocab_size + 5 * m.width
  )
  assert abs(total - paper) / paper < tolerance, f"{total / 1e6:.1f}M vs {paper / 1e6:.0f}M"


def test_superres_parameter_count():
  # The paper gives no count for the super-res model; check the architecture's formula:
  # 16 self-attention-only low-res layers, 32 high-res layers with cross-attention.
  config = load_config("muse_superres_512", None)
  total, by_module = _count(config)
  m = config.model
  assert by_module["low_encoder"] == _block_params(
    m.width, m.mlp_dim, m.num_low_layers, cross=False
  )
  assert by_module["blocks"] == _block_params(m.width, m.mlp_dim, m.num_layers)
  assert 0.75e9 < total < 0.8e9  # 774M


@pytest.mark.parametrize("name", ["muse_base_632m", "muse_base_3b", "muse_superres_512"])
def test_partition_specs_match_golden(name, fixtures_dir):
  """A sharding change must be deliberate: regenerate with
  `python tests/fixtures/partition_specs/regenerate.py` and commit the diff."""
  golden = json.loads((fixtures_dir / "partition_specs" / f"{name}.json").read_text())
  table = trainer.partition_spec_table(load_config(name, None))
  assert set(table) == set(golden), set(table) ^ set(golden)
  for path, entry in table.items():
    assert entry == golden[path], path
    assert len(entry["logical"]) == len(entry["shape"]), f"{path} lacks logical axis names"


@pytest.fixture(scope="module")
def tiny_superres():
  config = load_config("muse_superres_512")
  model = trainer.make_model(config.model)
  args = trainer.dummy_inputs(config, batch=2)
  params = jax.jit(model.init)(jax.random.key(0), *args)["params"]
  params = jax.tree.map(lambda x: x, trainer.nn.meta.unbox(params))
  return model, params, jax.jit(model.apply)


def _inputs(model, rng, batch=2, t=8, dt=16):
  r = np.random.default_rng(rng)
  ids = r.integers(0, model.vocab_size + 1, (batch, model.length)).astype(np.int32)
  low = r.integers(0, model.low_vocab_size, (batch, model.low_grid[0] * model.low_grid[1])).astype(
    np.int32
  )
  text = r.normal(size=(batch, t, dt)).astype(np.float32)
  mask = np.arange(t)[None] < np.array([[3], [6]])
  return ids, text, mask, low


def test_superres_conditioning(tiny_superres):
  model, params, apply = tiny_superres
  ids, text, mask, low = _inputs(model, 0)
  logits = apply({"params": params}, ids, text, mask, low)
  assert logits.shape == (2, 64, model.vocab_size) and logits.dtype == jnp.float32
  # Padding text tokens do not matter...
  noisy = np.where(mask[..., None], text, 100.0)
  np.testing.assert_allclose(apply({"params": params}, ids, noisy, mask, low), logits, atol=1e-5)
  # ... real text and low-res ids do.
  assert not np.allclose(apply({"params": params}, ids, text[::-1], mask, low), logits, atol=1e-4)
  assert not np.allclose(
    apply({"params": params}, ids, text, mask, (low + 1) % 32), logits, atol=1e-4
  )
  # Examples are independent.
  one = apply({"params": params}, ids[:1], text[:1], mask[:1], low[:1])
  np.testing.assert_allclose(one, logits[:1], atol=1e-5)
  with pytest.raises(ValueError, match="low_res_ids"):
    model.apply({"params": params}, ids, text, mask)


def test_bf16_compute_keeps_float32_params_and_logits(tiny_superres):
  model, params, _ = tiny_superres
  ids, text, mask, low = _inputs(model, 1)
  bf16 = model.clone(dtype=jnp.bfloat16)
  out = jax.jit(bf16.apply)({"params": params}, ids, text, mask, low)
  full = jax.jit(model.apply)({"params": params}, ids, text, mask, low)
  assert out.dtype == jnp.float32
  assert float(jnp.abs(out - full).max()) < 0.1 * float(jnp.abs(full).max())


def test_ids_shape_is_checked():
  model = MaskedTransformer(
    vocab_size=16, grid=(4, 4), width=8, num_layers=1, num_heads=2, mlp_dim=8
  )
  with pytest.raises(ValueError, match=r"ids must be \[B, 16\]"):
    model.init(
      jax.random.key(0), jnp.zeros((1, 15), jnp.int32), jnp.zeros((1, 2, 4)), jnp.ones((1, 2), bool)
    )


def test_relative_position_bias_goes_to_full_self_attention_only():
  """Base: one table per layer, none in the cross-attention. Super-res with multi-axis
  attention: a table in each low-res encoder layer only. Configs saved before the
  option existed build models without it."""
  full = load_config("muse_superres_512", None)
  full.text.update(length=4, dim=8)
  config = full.model
  config.update(grid=(4, 4), low_grid=(2, 2), width=8, num_heads=2, mlp_dim=8, num_layers=2,
                num_low_layers=3, window=2)  # fmt: skip
  cases = (
    ("base", "full", {"blocks": 2}),
    ("superres", "multi_axis", {"low_encoder": 3, "blocks": 0}),
  )
  for kind, attention, stacks in cases:
    config.update(kind=kind, attention=attention, relative_position=True)
    params = trainer.abstract_params(full)
    for stack, layers in stacks.items():
      block = params[stack]["layers"]
      assert "relative_bias" not in block.get("cross_attention", {})
      if not layers:
        assert "relative_bias" not in block["self_attention"]
        continue
      table = block["self_attention"]["relative_bias"]
      side = config.grid[0] if stack == "blocks" else config.low_grid[0]
      assert table.value.shape == (layers, (2 * side - 1) ** 2, 2)
      assert table.names[-1] == "heads"
  old = ml_collections.ConfigDict(json.loads(config.to_json()))
  del old["relative_position"], old["local_conv"]
  model = trainer.make_model(old)
  assert model.relative_position is False and model.local_conv is False
  # Runs trained with the convolution inside the MLPs (before local_conv) are refused.
  old.mlp_conv = True
  with pytest.raises(ValueError, match=r"model.mlp_conv=True: .* Train it again"):
    trainer.make_model(old)


def test_local_conv_goes_to_every_stack_over_its_own_grid():
  full = load_config("muse_superres_512", None)
  full.text.update(length=4, dim=8)
  full.model.update(grid=(4, 4), low_grid=(2, 2), width=8, num_heads=2, mlp_dim=8, num_layers=2,
                    num_low_layers=3, window=2, local_conv=True)  # fmt: skip
  params = trainer.abstract_params(full)
  for stack, layers in (("low_encoder", 3), ("blocks", 2)):
    for name in ("conv_self", "conv_mlp"):
      conv = params[stack]["layers"][name]["kernel"]
      assert conv.value.shape == (layers, 3, 3, 8) and conv.names[-1] == "embed"


@pytest.mark.parametrize(
  "cls, attention", [(MaskedTransformer, "full"), (SuperResTransformer, "multi_axis")]
)
def test_forward_flops_match_xla(cls, attention):
  kw = dict(
    vocab_size=64,
    grid=(8, 8),
    width=64,
    num_layers=2,
    num_heads=4,
    mlp_dim=128,
    attention=attention,
    window=4,
    scan_layers=False,
  )
  args = [jnp.zeros((1, 64), jnp.int32), jnp.zeros((1, 8, 16)), jnp.ones((1, 8), bool)]
  if cls is SuperResTransformer:
    kw.update(low_vocab_size=32, low_grid=(4, 4), num_low_layers=1)
    args.append(jnp.zeros((1, 16), jnp.int32))
  model = cls(**kw)
  params = jax.eval_shape(model.init, jax.random.key(0), *args)
  compiled = jax.jit(model.apply).lower(params, *args).compile()
  xla = compiled.cost_analysis()["flops"]
  ours = model.forward_flops(8, 16)
  # XLA also counts softmax, norms and GELU; matmuls dominate.
  assert 0.8 < ours / xla < 1.05, (ours, xla)


def test_masked_cross_entropy():
  r = np.random.default_rng(0)
  logits = r.normal(size=(2, 5, 7)).astype(np.float32)
  targets = r.integers(0, 7, (2, 5))
  mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  loss, acc = losses.masked_cross_entropy(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
  )
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(acc, (logits.argmax(-1) == targets)[mask].mean())
  # Unmasked positions carry no loss, whatever their logits.
  changed = np.where(mask[..., None], logits, 1e4 * r.normal(size=logits.shape)).astype(np.float32)
  np.testing.assert_allclose(
    losses.masked_cross_entropy(changed, targets, mask)[0], loss, rtol=1e-5
  )
  smooth, _ = losses.masked_cross_entropy(logits, targets, mask, label_smoothing=0.1)
  want = (0.9 * nll - 0.1 * log_p.mean(-1))[mask].mean()
  np.testing.assert_allclose(smooth, want, rtol=1e-5)
  none, _ = losses.masked_cross_entropy(logits, targets, np.zeros_like(mask))
  assert float(none) == 0.0
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.masked_cross_entropy(logits, targets, mask, label_smoothing=1.0)
