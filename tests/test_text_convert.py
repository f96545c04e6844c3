"""Hugging Face T5 / CLIP folders -> parameters: sharded checkpoints, layouts, clear errors."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from muse_jax.convert.hf_text import load_params, module_from_config, open_text_checkpoint
from muse_jax.convert.sharded_load import fit_sharding
from muse_jax.partitioning import make_mesh


def _clone(
  src: pathlib.Path, dst: pathlib.Path, weights: dict | None = None, config: dict | None = None
):
  """Copies a fixture folder, optionally with other weights or config fields."""
  shutil.copytree(src, dst)
  if weights is not None:
    save_file(weights, str(dst / "model.safetensors"))
  if config is not None:
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
  return dst


def _leaves_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sharded_index_loads_like_a_single_file(fixtures_dir, tmp_path):
  src = fixtures_dir / "text" / "t5_v1_1"
  tensors = load_file(str(src / "model.safetensors"))
  folder = _clone(src, tmp_path / "sharded")
  (folder / "model.safetensors").unlink()
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, str(folder / file))
    weight_map.update(dict.fromkeys(part, file))
  (folder / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": weight_map})
  )
  _leaves_equal(load_params(open_text_checkpoint(folder)), load_params(open_text_checkpoint(src)))


def test_each_tensor_is_read_once_and_lands_in_its_sharding(fixtures_dir):
  checkpoint = open_text_checkpoint(fixtures_dir / "text" / "clip")
  reads = []
  reader = checkpoint.reader
  original = type(reader).__getitem__
  try:
    type(reader).__getitem__ = lambda self, name: reads.append(name) or original(self, name)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    params = load_params(checkpoint, mesh=mesh)
  finally:
    type(reader).__getitem__ = original
  assert sorted(reads) == sorted(set(reads)) == sorted(reader)  # every tensor, once.
  layers = params["layers"]
  assert layers["mlp"]["fc1_kernel"].sharding.spec == P(None, "fsdp", "tensor")
  assert layers["attention"]["query_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["token_embedding"].sharding.spec == P("tensor", "fsdp")
  # The stacked layers hold each layer's own tensors, in our layout.
  q1 = reader["text_model.encoder.layers.1.self_attn.q_proj.weight"]  # [N*H, D]
  np.testing.assert_array_equal(
    np.asarray(layers["attention"]["query_kernel"][1]).reshape(32, 32), q1.T
  )


def test_fit_sharding_replicates_dimensions_the_mesh_does_not_divide():
  mesh = make_mesh({"fsdp": 4, "tensor": 2})
  sharding = NamedSharding(mesh, P("tensor", "fsdp"))
  assert fit_sharding((32101, 4096), sharding).spec == P(None, "fsdp")  # odd: 2 does not divide it.
  assert fit_sharding((32128, 4096), sharding).spec == P("tensor", "fsdp")
  assert fit_sharding((32128, 4098), sharding).spec == P("tensor", None)


def test_clip_model_config_and_prefixes(fixtures_dir):
  # A full CLIPModel config nests the text tower; only its text half is built.
  config = {
    "model_type": "clip",
    "architectures": ["CLIPModel"],
    "projection_dim": 24,
    "text_config": {
      "hidden_size": 32,
      "intermediate_size": 64,
      "num_hidden_layers": 2,
      "num_attention_heads": 4,
    },
  }
  module = module_from_config(config)
  assert (module.embed_dim, module.num_layers, module.projection_dim, module.vocab_size) == (
    32,
    2,
    24,
    49408,
  )
  # transformers 5 writes CLIPTextModel without the text_model. prefix, older ones with it.
  plain = open_text_checkpoint(fixtures_dir / "text" / "pipeline" / "text_encoder")
  prefixed = open_text_checkpoint(fixtures_dir / "text" / "clip")
  assert plain.sources[("token_embedding",)].names == ("embeddings.token_embedding.weight",)
  assert prefixed.sources[("token_embedding",)].names == (
    "text_model.embeddings.token_embedding.weight",
  )
  assert plain.module.projection_dim is None and prefixed.module.projection_dim == 24


def test_unknown_architectures_are_named(fixtures_dir, tmp_path):
  src = fixtures_dir / "text" / "t5"
  bert = _clone(
    src, tmp_path / "bert", config={"model_type": "bert", "architectures": ["BertModel"]}
  )
  with pytest.raises(
    ValueError, match=r"bert/config.json: model_type='bert', architectures=\['BertModel'\] is not"
  ):
    open_text_checkpoint(bert)
  classifier = _clone(
    src, tmp_path / "cls", config={"architectures": ["T5ForSequenceClassification"]}
  )
  with pytest.raises(ValueError, match="T5ForSequenceClassification"):
    open_text_checkpoint(classifier)
  with pytest.raises(ValueError, match="feed_forward_proj='gated-gelu-x'"):
    open_text_checkpoint(_clone(src, tmp_path / "ff", config={"feed_forward_proj": "gated-gelu-x"}))


def test_missing_files_are_named(fixtures_dir, tmp_path):
  src = fixtures_dir / "text" / "t5"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    open_text_checkpoint(tmp_path / "nowhere")
  no_config = _clone(src, tmp_path / "no_config")
  (no_config / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no_config: missing config.json"):
    open_text_checkpoint(no_config)
  pickled = _clone(src, tmp_path / "pickled")
  (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
  with pytest.raises(
    FileNotFoundError, match=r"found \['pytorch_model.bin'\] but no model.safetensors"
  ):
    open_text_checkpoint(pickled)
  shutil.copytree(src, tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
  with pytest.raises(FileNotFoundError, match="no_weights: missing model.safetensors"):
    open_text_checkpoint(tmp_path / "no_weights")


def test_weights_that_disagree_with_the_config(fixtures_dir, tmp_path):
  src = fixtures_dir / "text" / "t5"
  tensors = load_file(str(src / "model.safetensors"))
  lacking = {
    k: v for k, v in tensors.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  }
  with pytest.raises(
    KeyError, match=r"lacks 1 tensors .*encoder.block.1.layer.1.DenseReluDense.wo.weight"
  ):
    load_params(open_text_checkpoint(_clone(src, tmp_path / "lacking", weights=lacking)))
  with pytest.raises(
    ValueError,
    match=r"has 8 tensors that its config does not account for, e.g. \[.encoder.block.2.layer.0",
  ):
    load_params(open_text_checkpoint(_clone(src, tmp_path / "deeper", config={"num_layers": 2})))
  with pytest.raises(ValueError, match=r"has shape \(48, 32\); the config implies \(32, 40\)"):
    load_params(open_text_checkpoint(_clone(src, tmp_path / "wider", config={"d_ff": 40})))


def test_loads_in_the_requested_dtype(fixtures_dir):
  params = load_params(
    open_text_checkpoint(fixtures_dir / "text" / "pipeline" / "text_encoder", dtype=jnp.bfloat16)
  )
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
