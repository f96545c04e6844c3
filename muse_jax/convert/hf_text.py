"""Hugging Face T5 and CLIP text-encoder folders -> our Flax modules and their parameters.

Reads what transformers' `save_pretrained` writes (config.json plus model.safetensors or a
sharded model.safetensors.index.json) for T5EncoderModel / T5ForConditionalGeneration
(the encoder half; MT5 alike) and CLIPTextModel / CLIPTextModelWithProjection / CLIPModel
(the text half), with no torch.

Loading goes one tensor at a time: each checkpoint tensor is read from disk, transposed
into our layout, cast, and `jax.device_put` straight into the sharding that its logical
axis names give under the rules; per-layer tensors are written into their slice of the
stacked (``nn.scan``) parameter on the devices by a donated in-place update. Host memory
therefore peaks near one tensor (a few copies of it at most), never the whole model.

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
import functools
import math
import pathlib
from typing import Any

from absl import logging
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from muse_jax.convert.io import PathLike, SafetensorsFolder, read_json
from muse_jax.models.clip import CLIPTextTransformer
from muse_jax.models.t5 import ACTIVATIONS, T5Encoder
from muse_jax.partitioning import DEFAULT_RULES, Rules, logical_shardings, unbox_abstract

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


def _identity(x: np.ndarray) -> np.ndarray:
  return x


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one parameter comes from: one checkpoint tensor, or one per layer (stacked)."""

  names: tuple[str, ...]  # checkpoint tensor names; one per layer when stacked.
  transform: Callable[[np.ndarray], np.ndarray] = _identity  # HF layout -> ours.
  stacked: bool = False  # names[i] fills index i of the leading (layers) axis.


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


def t5_checkpoint_parts(config: Mapping[str, Any], names: set[str], dtype: Any):
  """T5Encoder, its parameter sources and the unused-tensor predicate for a T5 config."""
  c = {**_T5_DEFAULTS, **config}
  parts = c["feed_forward_proj"].split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"feed_forward_proj={c['feed_forward_proj']!r}; expected 'ACT' or 'gated-ACT'")
  gated, act = len(parts) == 2, parts[-1]
  act = "gelu_new" if c["feed_forward_proj"] == "gated-gelu" else act  # as transformers maps it.
  if act not in ACTIVATIONS:
    raise ValueError(
      f"feed_forward_proj={c['feed_forward_proj']!r}: activation {act!r} is not supported"
    )
  module = T5Encoder(
    vocab_size=c["vocab_size"],
    embed_dim=c["d_model"],
    num_layers=c["num_layers"],
    num_heads=c["num_heads"],
    head_dim=c["d_kv"],
    mlp_dim=c["d_ff"],
    activation=act,
    gated=gated,
    num_buckets=c["relative_attention_num_buckets"],
    max_distance=c["relative_attention_max_distance"],
    eps=c["layer_norm_epsilon"],
    dtype=dtype,
    param_dtype=dtype,
  )
  d, n, h, layers = c["d_model"], c["num_heads"], c["d_kv"], range(c["num_layers"])
  embedding = "shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight"

  def stack(template: str, transform=_identity) -> Source:
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
  for w in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
    sources[("blocks", "mlp", w)] = stack(f"layer.1.DenseReluDense.{w}.weight", np.transpose)

  def unused(name: str) -> bool:  # the decoder, the LM head, the tied copy of the embedding.
    return name.startswith(("decoder.", "lm_head.")) or name == "encoder.embed_tokens.weight"

  return module, sources, unused


def clip_checkpoint_parts(config: Mapping[str, Any], names: set[str], dtype: Any):
  """CLIPTextTransformer, its parameter sources and the unused-tensor predicate."""
  c = {**_CLIP_DEFAULTS, **config}
  if c["hidden_act"] not in ACTIVATIONS:
    raise ValueError(
      f"hidden_act={c['hidden_act']!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
    )
  d, n = c["hidden_size"], c["num_attention_heads"]
  if d % n:
    raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {n}")
  h, layers = d // n, range(c["num_hidden_layers"])
  prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in names else ""
  has_projection = "text_projection.weight" in names
  module = CLIPTextTransformer(
    vocab_size=c["vocab_size"],
    max_length=c["max_position_embeddings"],
    embed_dim=d,
    num_layers=c["num_hidden_layers"],
    num_heads=n,
    mlp_dim=c["intermediate_size"],
    activation=c["hidden_act"],
    eps=c["layer_norm_eps"],
    eos_token_id=c["eos_token_id"],
    projection_dim=c["projection_dim"] if has_projection else None,
    dtype=dtype,
    param_dtype=dtype,
  )

  def stack(template: str, transform=_identity) -> Source:
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
  if has_projection:
    sources[("projection",)] = Source(("text_projection.weight",), np.transpose)

  def unused(name: str) -> bool:  # CLIPModel's image tower; old checkpoints' position_ids buffer.
    return name.startswith(("vision_model.", "visual_projection.")) or name in (
      "logit_scale",
      f"{prefix}embeddings.position_ids",
    )

  return module, sources, unused


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


def open_text_checkpoint(folder: PathLike, *, dtype: Any = jnp.float32) -> TextCheckpoint:
  """Reads a text-encoder folder's config.json and safetensors header(s); no weights yet.

  Args:
    folder: a transformers model folder (config.json + safetensors).
    dtype: compute and parameter dtype of the module (float32 or bfloat16).

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
    module, sources, unused = t5_checkpoint_parts(config, names, dtype)
  else:
    if model_type == "clip":  # a full CLIPModel: the text half, projection size at the top level.
      config = {
        **config.get("text_config", {}),
        "projection_dim": config.get("projection_dim", 512),
      }
    module, sources, unused = clip_checkpoint_parts(config, names, dtype)
  return TextCheckpoint(folder, family, dict(config), module, sources, unused, reader)


def _fit(shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    size = math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if shape[dim] % size:
      logging.info(
        "replicating dimension %d (size %d) of a %s parameter: %s does not divide it",
        dim,
        shape[dim],
        shape,
        axes,
      )
      spec[dim] = None
  return NamedSharding(sharding.mesh, P(*spec))


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of one slice of a stacked parameter (its leading axis removed)."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
  return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, axis=0)


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


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
    The parameter tree (``{"token_embedding": ..., "layers": {...}}``), each leaf a
    ``jax.Array`` already in its sharding.

  Raises:
    KeyError: tensors the model needs are missing from the checkpoint.
    ValueError: a tensor has the wrong shape, or the checkpoint has tensors the model
      does not know (the config does not describe these weights).
  """
  folder, reader = checkpoint.folder, checkpoint.reader
  abstract = checkpoint.abstract_params(rules)
  if mesh is None:
    shardings = jax.tree.map(
      lambda _: SingleDeviceSharding(jax.devices()[0]), unbox_abstract(abstract)
    )
  else:
    shardings = logical_shardings(abstract, mesh, rules)
  flat_abstract = traverse_util.flatten_dict(unbox_abstract(abstract))
  flat_shardings = traverse_util.flatten_dict(shardings)
  assert set(flat_abstract) == set(checkpoint.sources), set(flat_abstract) ^ set(checkpoint.sources)

  needed = {name for source in checkpoint.sources.values() for name in source.names}
  missing = sorted(needed - set(reader))
  if missing:
    raise KeyError(
      f"{folder}: the checkpoint lacks {len(missing)} tensors that config.json implies, e.g. {missing[:4]}"
    )
  unknown = sorted(n for n in reader if n not in needed and not checkpoint.unused(n))
  if unknown:
    raise ValueError(
      f"{folder}: the checkpoint has {len(unknown)} tensors that config.json does not account for, "
      f"e.g. {unknown[:4]}; config.json and the weights disagree"
    )

  def read(name: str, source: Source, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    raw = reader[name]
    array = source.transform(raw)
    if array.shape != shape:
      raise ValueError(
        f"{folder}: tensor {name!r} has shape {raw.shape}; the config implies {shape} (ours)"
      )
    return np.asarray(array, dtype=dtype)

  params = {}
  for path, leaf in flat_abstract.items():
    source, sharding = checkpoint.sources[path], _fit(leaf.shape, flat_shardings[path])
    if not source.stacked:
      params[path] = jax.device_put(read(source.names[0], source, leaf.shape, leaf.dtype), sharding)
      continue
    if len(source.names) != leaf.shape[0]:
      raise ValueError(
        f"{folder}: {len(source.names)} layers for a parameter stacked {leaf.shape[0]} deep"
      )
    stacked, layer_sharding = _zeros(leaf.shape, leaf.dtype, sharding), _layer_sharding(sharding)
    for i, name in enumerate(source.names):
      layer = jax.device_put(read(name, source, leaf.shape[1:], leaf.dtype), layer_sharding)
      stacked = _set_layer(stacked, layer, i)
    params[path] = stacked
  return traverse_util.unflatten_dict(params)
