"""Hugging Face T5 and CLIP text-encoder folders -> our Flax modules and their parameters.

Reads what transformers' `save_pretrained` writes (config.json plus model.safetensors or a
sharded model.safetensors.index.json) for T5EncoderModel / T5ForConditionalGeneration
(the encoder half; MT5 alike) and CLIPTextModel / CLIPTextModelWithProjection / CLIPModel
(the text half), with no torch.

Loading goes tensor by tensor straight into the parameters' shardings
(`muse_jax.convert.sharded_load`), so host memory peaks near one tensor, not the model.

Name mapping (HF ``Linear.weight`` is ``[out, in]``; ours are ``[in, out]`` with heads split):

T5 (prefix ``encoder.``)                         ours
  shared.weight [V, D]                           embedding
  block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, N]
                                                 relative_position_bias/embedding
  block.{i}.layer.0.SelfAttention.{q,k,v}.weight blocks/attention/{query,key,value} [i, D, N, H]
  block.{i}.layer.0.SelfAttention.o.weight       blocks/attention/out [i, N, H, D]
  block.{i}.layer.0.layer_norm.weight            blocks/attention_norm/scale [i]
  block.{i}.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}.weight  blocks/mlp/{...} [i, in, out]
  block.{i}.layer.1.layer_norm.weight            blocks/mlp_norm/scale [i]
  final_layer_norm.weight                        final_norm/scale

CLIP (prefix ``text_model.`` or none, as transformers 5 writes CLIPTextModel)
  embeddings.{token,position}_embedding.weight   {token,position}_embedding
  encoder.layers.{i}.self_attn.{q,k,v}_proj.*    layers/attention/{query,key,value}_{kernel,bias}
  encoder.layers.{i}.self_attn.out_proj.*        layers/attention/out_{kernel,bias}
  encoder.layers.{i}.layer_norm{1,2}.*           layers/{attention,mlp}_norm/{scale,bias}
  encoder.layers.{i}.mlp.fc{1,2}.*               layers/mlp/fc{1,2}_{kernel,bias}
  final_layer_norm.*                             final_norm/{scale,bias}
  text_projection.weight [P, D] (no prefix)      projection [D, P]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.convert.io import PathLike, SafetensorsFolder, read_json
from muse_jax.convert.sharded_load import Source, load_sharded
from muse_jax.models.clip import CLIPTextTransformer
from muse_jax.models.t5 import ACTIVATIONS, T5Encoder
from muse_jax.partitioning import DEFAULT_RULES, Rules

T5_ARCHITECTURES = (
  "T5EncoderModel",
  "T5ForConditionalGeneration",
  "T5Model",
  "MT5EncoderModel",
  "MT5ForConditionalGeneration",
  "MT5Model",
)
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPModel")
FAMILIES = {"t5": "t5", "mt5": "t5", "clip_text_model": "clip", "clip": "clip"}

# transformers' config defaults, for fields a config.json leaves out.
_T5_DEFAULTS = dict(
  vocab_size=32128,
  d_model=512,
  d_kv=64,
  d_ff=2048,
  num_layers=6,
  num_heads=8,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  layer_norm_epsilon=1e-6,
  feed_forward_proj="relu",
)
_CLIP_DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  projection_dim=512,
  eos_token_id=49407,
)


@dataclasses.dataclass(frozen=True)
class TextCheckpoint:
  """An opened text-encoder folder: the module to run and where its weights are."""

  folder: pathlib.Path
  family: str  # "t5" or "clip".
  config: dict[str, Any]  # the (text) config, with transformers' defaults filled in.
  module: nn.Module  # T5Encoder or CLIPTextTransformer.
  sources: dict[tuple[str, ...], Source]  # parameter path -> checkpoint tensors.
  unused: Callable[[str], bool]  # checkpoint tensors the encoder does not need.
  reader: SafetensorsFolder

  def abstract_params(self, rules: Rules = DEFAULT_RULES) -> Any:
    """The boxed ``eval_shape`` of the parameters (shapes, dtypes, logical names)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    args = (ids, jnp.ones((1, 1), bool)) if self.family == "t5" else (ids,)
    with nn.logical_axis_rules(rules):
      return jax.eval_shape(self.module.init, jax.random.key(0), *args)["params"]


def _linear(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """``[out, in]`` Linear weight -> ``[in, out]`` reshaped to ``shape``."""
  return lambda w: w.T.reshape(shape)


def t5_module(
  config: Mapping[str, Any], dtype: Any = jnp.float32, param_dtype: Any = None
) -> T5Encoder:
  """The ``T5Encoder`` a T5 / MT5 config.json describes (missing fields: transformers' defaults).

  ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (default: ``dtype``).
  """
  c = {**_T5_DEFAULTS, **config}
  parts = c["feed_forward_proj"].split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"feed_forward_proj={c['feed_forward_proj']!r}; expected 'ACT' or 'gated-ACT'")
  act = (
    "gelu_new" if c["feed_forward_proj"] == "gated-gelu" else parts[-1]
  )  # as transformers maps it.
  if act not in ACTIVATIONS:
    raise ValueError(
      f"feed_forward_proj={c['feed_forward_proj']!r}: activation {act!r} is not supported"
    )
  return T5Encoder(
    vocab_size=c["vocab_size"],
    embed_dim=c["d_model"],
    num_layers=c["num_layers"],
    num_heads=c["num_heads"],
    head_dim=c["d_kv"],
    mlp_dim=c["d_ff"],
    activation=act,
    gated=len(parts) == 2,
    num_buckets=c["relative_attention_num_buckets"],
    max_distance=c["relative_attention_max_distance"],
    eps=c["layer_norm_epsilon"],
    dtype=dtype,
    param_dtype=dtype if param_dtype is None else param_dtype,
  )


def t5_sources(config: Mapping[str, Any], names: set[str]) -> tuple[dict, Callable[[str], bool]]:
  """Parameter path -> checkpoint tensors for a T5 config, and the unused-tensor predicate.

  Args:
    config: the config.json contents.
    names: the checkpoint's tensor names (the shared embedding may be saved under either
      of its tied names).
  """
  c = {**_T5_DEFAULTS, **config}
  d, n, h, layers = c["d_model"], c["num_heads"], c["d_kv"], range(c["num_layers"])
  embedding = "shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight"

  def stack(template: str, transform=None) -> Source:
    return Source(tuple(f"encoder.block.{i}.{template}" for i in layers), transform, stacked=True)

  attention = "layer.0.SelfAttention"
  sources = {
    ("embedding",): Source((embedding,)),
    ("relative_position_bias", "embedding"): Source(
      (f"encoder.block.0.{attention}.relative_attention_bias.weight",)
    ),
    ("blocks", "attention", "query"): stack(f"{attention}.q.weight", _linear((d, n, h))),
    ("blocks", "attention", "key"): stack(f"{attention}.k.weight", _linear((d, n, h))),
    ("blocks", "attention", "value"): stack(f"{attention}.v.weight", _linear((d, n, h))),
    ("blocks", "attention", "out"): stack(f"{attention}.o.weight", _linear((n, h, d))),
    ("blocks", "attention_norm", "scale"): stack("layer.0.layer_norm.weight"),
    ("blocks", "mlp_norm", "scale"): stack("layer.1.layer_norm.weight"),
    ("final_norm", "scale"): Source(("encoder.final_layer_norm.weight",)),
  }
  gated = c["feed_forward_proj"].startswith("gated-")
  for w in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
    sources[("blocks", "mlp", w)] = stack(f"layer.1.DenseReluDense.{w}.weight", np.transpose)

  def unused(name: str) -> bool:  # the decoder, the LM head, the tied copy of the embedding.
    return name.startswith(("decoder.", "lm_head.")) or name == "encoder.embed_tokens.weight"

  return sources, unused


def clip_module(
  config: Mapping[str, Any],
  dtype: Any = jnp.float32,
  param_dtype: Any = None,
  *,
  projection: bool = True,
) -> CLIPTextTransformer:
  """The ``CLIPTextTransformer`` a CLIP text config describes (missing: transformers' defaults).

  Args:
    config: a ``clip_text_model`` config.json, or a CLIPModel's ``text_config`` with the
      top-level ``projection_dim`` added.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters (default: ``dtype``).
    projection: whether the model has the text projection (CLIPTextModel has none).
  """
  c = {**_CLIP_DEFAULTS, **config}
  if c["hidden_act"] not in ACTIVATIONS:
    raise ValueError(
      f"hidden_act={c['hidden_act']!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
    )
  if c["hidden_size"] % c["num_attention_heads"]:
    raise ValueError(
      f"hidden_size {c['hidden_size']} is not divisible by num_attention_heads {c['num_attention_heads']}"
    )
  return CLIPTextTransformer(
    vocab_size=c["vocab_size"],
    max_length=c["max_position_embeddings"],
    embed_dim=c["hidden_size"],
    num_layers=c["num_hidden_layers"],
    num_heads=c["num_attention_heads"],
    mlp_dim=c["intermediate_size"],
    activation=c["hidden_act"],
    eps=c["layer_norm_eps"],
    eos_token_id=c["eos_token_id"],
    projection_dim=c["projection_dim"] if projection else None,
    dtype=dtype,
    param_dtype=dtype if param_dtype is None else param_dtype,
  )


def clip_sources(config: Mapping[str, Any], names: set[str]) -> tuple[dict, Callable[[str], bool]]:
  """Parameter path -> checkpoint tensors for a CLIP text config, and the unused predicate.

  Args:
    config: the (text) config.
    names: the checkpoint's tensor names; they tell the ``text_model.`` prefix (absent in
      the CLIPTextModel folders transformers 5 writes) and whether there is a projection.
  """
  c = {**_CLIP_DEFAULTS, **config}
  d, n = c["hidden_size"], c["num_attention_heads"]
  h, layers = d // n, range(c["num_hidden_layers"])
  prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in names else ""

  def stack(template: str, transform=None) -> Source:
    return Source(
      tuple(f"{prefix}encoder.layers.{i}.{template}" for i in layers), transform, stacked=True
    )

  sources = {
    ("token_embedding",): Source((f"{prefix}embeddings.token_embedding.weight",)),
    ("position_embedding",): Source((f"{prefix}embeddings.position_embedding.weight",)),
    ("final_norm", "scale"): Source((f"{prefix}final_layer_norm.weight",)),
    ("final_norm", "bias"): Source((f"{prefix}final_layer_norm.bias",)),
    ("layers", "attention", "out_kernel"): stack("self_attn.out_proj.weight", _linear((n, h, d))),
    ("layers", "attention", "out_bias"): stack("self_attn.out_proj.bias"),
    ("layers", "mlp", "fc1_kernel"): stack("mlp.fc1.weight", np.transpose),
    ("layers", "mlp", "fc1_bias"): stack("mlp.fc1.bias"),
    ("layers", "mlp", "fc2_kernel"): stack("mlp.fc2.weight", np.transpose),
    ("layers", "mlp", "fc2_bias"): stack("mlp.fc2.bias"),
  }
  for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
    sources[("layers", "attention", f"{ours}_kernel")] = stack(
      f"self_attn.{theirs}_proj.weight", _linear((d, n, h))
    )
    sources[("layers", "attention", f"{ours}_bias")] = stack(
      f"self_attn.{theirs}_proj.bias", lambda b: b.reshape(n, h)
    )
  for ours, theirs in (("attention_norm", "layer_norm1"), ("mlp_norm", "layer_norm2")):
    sources[("layers", ours, "scale")] = stack(f"{theirs}.weight")
    sources[("layers", ours, "bias")] = stack(f"{theirs}.bias")
  if "text_projection.weight" in names:
    sources[("projection",)] = Source(("text_projection.weight",), np.transpose)

  def unused(name: str) -> bool:  # CLIPModel's image tower; old checkpoints' position_ids buffer.
    return name.startswith(("vision_model.", "visual_projection.")) or name in (
      "logit_scale",
      f"{prefix}embeddings.position_ids",
    )

  return sources, unused


def module_from_config(
  config: Mapping[str, Any], dtype: Any = jnp.float32, param_dtype: Any = None
) -> nn.Module:
  """The encoder module a config.json describes, without weights (sizes, eval_shape, benchmarks)."""
  family = FAMILIES.get(config.get("model_type"))
  if family == "t5":
    return t5_module(config, dtype, param_dtype)
  if family == "clip":
    if config["model_type"] == "clip":
      config = {
        **config.get("text_config", {}),
        "projection_dim": config.get("projection_dim", 512),
      }
    projection = any(a != "CLIPTextModel" for a in config.get("architectures") or ["CLIPModel"])
    return clip_module(config, dtype, param_dtype, projection=projection)
  raise ValueError(
    f"model_type={config.get('model_type')!r} is not a supported text encoder; expected one of {sorted(FAMILIES)}"
  )


def _check_weights_present(folder: pathlib.Path) -> None:
  if any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
    return
  pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin*"))
  if pickles:
    raise FileNotFoundError(
      f"{folder}: found {pickles} but no model.safetensors; PyTorch pickles cannot be read without torch. "
      "Convert once with transformers: AutoModel.from_pretrained(folder).save_pretrained(folder)"
    )
  raise FileNotFoundError(
    f"{folder}: missing model.safetensors (or model.safetensors.index.json and its shards)"
  )


def open_text_checkpoint(
  folder: PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None
) -> TextCheckpoint:
  """Reads a text-encoder folder's config.json and safetensors header(s); no weights yet.

  Args:
    folder: a transformers model folder (config.json + safetensors).
    dtype: compute dtype of the module (float32 or bfloat16).
    param_dtype: storage dtype of the parameters (default: ``dtype``).

  Returns:
    A ``TextCheckpoint`` with the module to run and the tensor mapping.

  Raises:
    FileNotFoundError: the folder, config.json or the weights are missing.
    ValueError: the architecture is not a supported T5 or CLIP text encoder.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"text encoder folder {folder} does not exist")
  config = read_json(folder / "config.json")
  model_type, architectures = config.get("model_type"), config.get("architectures") or []
  family = FAMILIES.get(model_type)
  known = T5_ARCHITECTURES if family == "t5" else CLIP_ARCHITECTURES
  if family is None or any(a not in known for a in architectures):
    raise ValueError(
      f"{folder}/config.json: model_type={model_type!r}, architectures={architectures} is not a supported text "
      f"encoder; expected model_type in {sorted(FAMILIES)} with architectures among "
      f"{T5_ARCHITECTURES + CLIP_ARCHITECTURES}"
    )
  _check_weights_present(folder)
  reader = SafetensorsFolder(folder, stems=("model",))
  names = set(reader)
  if family == "t5":
    module = t5_module(config, dtype, param_dtype)
    sources, unused = t5_sources(config, names)
  else:
    if model_type == "clip":  # a full CLIPModel: its text half; the projection size is top-level.
      config = {
        **config.get("text_config", {}),
        "projection_dim": config.get("projection_dim", 512),
      }
    module = clip_module(config, dtype, param_dtype, projection="text_projection.weight" in names)
    sources, unused = clip_sources(config, names)
  return TextCheckpoint(folder, family, dict(config), module, sources, unused, reader)


def load_params(
  checkpoint: TextCheckpoint,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: Rules = DEFAULT_RULES,
) -> dict[str, Any]:
  """Reads the checkpoint into the module's parameter tree, tensor by tensor, sharded.

  Args:
    checkpoint: from ``open_text_checkpoint``.
    mesh: the device mesh; None places everything on the first device.
    rules: logical-to-mesh rules for the parameters' axis names.

  Returns:
    The parameter tree, each leaf a ``jax.Array`` already in its sharding.

  Raises:
    KeyError: tensors the model needs are missing from the checkpoint.
    ValueError: a tensor has the wrong shape, or the checkpoint has tensors that
      config.json does not account for.
  """
  return load_sharded(
    checkpoint.abstract_params(rules),
    checkpoint.sources,
    checkpoint.reader,
    unused=checkpoint.unused,
    mesh=mesh,
    rules=rules,
  )
