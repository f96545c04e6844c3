"""diffusers ``UVit2DModel`` folders (aMUSEd's ``transformer/``) -> our ``UVit2D``, without torch.

A folder holds ``config.json`` and ``diffusion_pytorch_model[.<variant>].safetensors``
(or a sharded index). The config's keys are ``UVit2D``'s field names; any other
non-private key is an error (it would be an option our module ignores).

Weights are matched by walking *our* parameter tree and naming the diffusers
tensor(s) each leaf comes from, so a missing tensor, a tensor left over, or a shape
mismatch is an error naming both sides and the folder:

  layers/attn1/qkv/kernel [22, D, 3, N, H] <- transformer_layers.{i}.attn1.to_{q,k,v}.weight
  layers/norm3/modulation/kernel [22, D, 2, D] <- transformer_layers.{i}.norm3.linear.weight
  down_block/res_blocks_0/grn/gamma [4C] <- down_block.res_blocks.0.channelwise_norm.gamma

Linear weights ``[out, in]`` are transposed, fused projections stacked on a new axis
before the output axis, 1x1 conv kernels treated as linears, the depthwise kernel
``[C, 1, 3, 3]`` becomes HWIO, the 2x2 down conv ``[O, C, 2, 2] -> [2, 2, C, O]`` and
the 2x2 transposed up conv ``[C, O, 2, 2] -> [C, 2, 2, O]``; with ``scan_layers``
the per-layer arrays are stacked on a leading axis.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
import pathlib
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.convert.io import SafetensorsFolder, read_json
from muse_jax.models.uvit import UVit2D
from muse_jax.partitioning import unbox_abstract

PathLike = str | os.PathLike

# Our fields that are not part of diffusers' config.
_OWN_FIELDS = ("scan_layers", "dtype", "param_dtype", "parent", "name")
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(UVit2D) if f.name not in _OWN_FIELDS)

# Module names whose diffusers name differs (context-free ones).
_RENAMES = {
  "encoder_proj_norm": "encoder_proj_layer_norm",
  "cond_linear_1": "cond_embed.linear_1",
  "cond_linear_2": "cond_embed.linear_2",
  "embed_norm": "embed.layer_norm",
  "embed_proj": "embed.conv",
  "mlm_conv1": "mlm_layer.conv1",
  "mlm_norm": "mlm_layer.layer_norm",
  "mlm_conv2": "mlm_layer.conv2",
  "linear_1": "channelwise_linear_1",
  "linear_2": "channelwise_linear_2",
  "grn": "channelwise_norm",
  "wi": "net.0.proj",
  "wo": "net.2",
  "out": "to_out.0",
}
# Fused projections: one of our kernels <- several diffusers linears.
_FUSED = {"qkv": ("to_q", "to_k", "to_v"), "kv": ("to_k", "to_v"), "q": ("to_q",)}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma", "beta": "beta"}


def uvit_kwargs_from_config(cfg: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
  """``UVit2D`` keyword arguments from a diffusers ``UVit2DModel`` config.

  Missing keys take diffusers' defaults (which are our field defaults).

  Raises:
    ValueError: for another model class or keys our module does not know.
  """
  cls = cfg.get("_class_name", "UVit2DModel")
  if cls != "UVit2DModel":
    raise ValueError(f"{source}: _class_name is {cls!r}; expected 'UVit2DModel'")
  unknown = sorted(k for k in cfg if not k.startswith("_") and k not in CONFIG_KEYS)
  if unknown:
    raise ValueError(
      f"{source}: unknown UVit2DModel options {unknown}; expected only {sorted(CONFIG_KEYS)}"
    )
  return {k: cfg[k] for k in CONFIG_KEYS if k in cfg}


def abstract_params(model: UVit2D) -> Any:
  """Shape/dtype tree of the module's params (traced, nothing computed)."""
  side = 2
  args = (
    jax.ShapeDtypeStruct((1, side, side), jnp.int32),
    jax.ShapeDtypeStruct((1, 1, model.encoder_hidden_size), jnp.float32),
    jax.ShapeDtypeStruct((1, model.cond_embed_dim), jnp.float32),
    jax.ShapeDtypeStruct((1, model.num_micro_conds), jnp.float32),
  )
  tree = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)
  return unbox_abstract(tree)["params"]


def diffusers_names(path: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
  """The diffusers tensor names one of our parameters comes from, and its kind.

  Args:
    path: the parameter's path in our tree, e.g. ``("layers", "attn1", "qkv", "kernel")``.

  Returns:
    ``(names, kind)``: names may contain ``{layer}`` (scanned layers); kind is one of
    ``linear``, ``depthwise``, ``down``, ``up``, ``embedding``, ``vector``.
  """
  *modules, leaf = path
  parts: list[str] = []
  fused = ("",)
  for i, name in enumerate(modules):
    parent = modules[i - 1] if i else ""
    indexed = re.fullmatch(r"(res_blocks|attention_blocks|layers)_(\d+)", name)
    if indexed:
      block = "transformer_layers" if indexed[1] == "layers" else indexed[1]
      parts.append(f"{block}.{indexed[2]}")
    elif name == "layers":
      parts.append("transformer_layers.{layer}")
    elif name == "modulation":  # AdaNorm's projection, or the ConvNeXt block's mapper
      parts.append("linear" if re.fullmatch(r"norm\d", parent) else "cond_embeds_mapper")
    elif name in _FUSED and i == len(modules) - 1:
      fused = _FUSED[name]
    else:
      parts.append(_RENAMES.get(name, name))
  if leaf == "embedding":
    return ("embed.embeddings.weight",), "embedding"
  if leaf in ("depthwise", "depthwise_bias"):
    suffix = "weight" if leaf == "depthwise" else "bias"
    return (
      ".".join([*parts, f"depthwise.{suffix}"]),
    ), "depthwise" if leaf == "depthwise" else "vector"
  resample = modules[-1] if modules else ""
  if resample in ("downsample", "upsample"):  # the conv sits under `.conv`, beside `.norm`
    parts.append("conv")
    kind = ("down" if resample == "downsample" else "up") if leaf == "kernel" else "vector"
    return (".".join([*parts, _LEAVES[leaf]]),), kind
  names = tuple(".".join(p for p in [*parts, f, _LEAVES[leaf]] if p) for f in fused)
  return names, "linear" if leaf == "kernel" else "vector"


def _convert(arrays: list[np.ndarray], kind: str, shape: tuple[int, ...]) -> np.ndarray:
  """diffusers tensor(s) -> our layout, reshaped to ``shape`` (fused axes split)."""
  if kind == "linear":  # [out, in] (or a 1x1 conv [out, in, 1, 1]) -> [in, (fused,) out]
    mats = [a.reshape(a.shape[0], -1).T for a in arrays]
    return (mats[0] if len(mats) == 1 else np.stack(mats, axis=1)).reshape(shape)
  if kind == "vector":  # biases (fused ones stacked), norm weights, GRN [1, 1, 1, F]
    return (np.stack(arrays) if len(arrays) > 1 else arrays[0]).reshape(shape)
  (a,) = arrays
  if kind in ("depthwise", "down"):  # [C, 1, 3, 3] -> [3, 3, 1, C]; [O, C, 2, 2] -> [2, 2, C, O]
    return a.transpose(2, 3, 1, 0)
  if kind == "up":  # ConvTranspose [C, O, 2, 2] -> [C, 2, 2, O]
    return a.transpose(0, 2, 3, 1)
  return a  # embedding [V, C]


def convert_params(
  tensors: Mapping[str, np.ndarray],
  abstract: Any,
  *,
  source: str,
  num_layers: int,
  param_dtype: Any = np.float32,
  shardings: Any = None,
) -> Any:
  """Builds our param tree from diffusers tensors, checking every name and shape.

  Args:
    tensors: diffusers name -> array (e.g. a lazy ``SafetensorsFolder``).
    abstract: our param tree of ``ShapeDtypeStruct`` (see ``abstract_params``).
    source: names the weights (folder) in errors.
    num_layers: transformer layers (the stacked axis of scanned params).
    param_dtype: dtype of the returned params.
    shardings: optional tree of shardings like ``abstract``; leaves go straight there.

  Returns:
    The ``params`` tree (no ``{"params": ...}`` wrapper).

  Raises:
    KeyError: a tensor our model needs is missing (naming it, our path and ``source``).
    ValueError: a shape mismatch, or tensors left over that our model has no place for.
  """
  flat = flax.traverse_util.flatten_dict(abstract)
  flat_sh = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
  used: set[str] = set()
  out = {}
  for path, leaf in flat.items():
    names, kind = diffusers_names(path)
    scanned = any("{layer}" in n for n in names)
    per_layer = (
      [[n.format(layer=i) for n in names] for i in range(num_layers)] if scanned else [list(names)]
    )
    shape = tuple(leaf.shape[1:] if scanned else leaf.shape)
    arrays = []
    for layer_names in per_layer:
      missing = [n for n in layer_names if n not in tensors]
      if missing:
        raise KeyError(
          f"{source}: tensor {missing[0]!r} (for our {'/'.join(path)}) is not in the checkpoint"
        )
      raw = [np.asarray(tensors[n]) for n in layer_names]
      try:
        arr = _convert(raw, kind, shape)
      except ValueError:
        arr = None
      if arr is None or arr.shape != shape:
        found = [f"{n} {tuple(r.shape)}" for n, r in zip(layer_names, raw)]
        raise ValueError(
          f"{source}: shape mismatch: {', '.join(found)} cannot become our {'/'.join(path)} of shape {shape}"
        )
      arrays.append(arr)
      used.update(layer_names)
    value = (np.stack(arrays) if scanned else arrays[0]).astype(param_dtype)
    out[path] = jax.device_put(value, flat_sh[path]) if path in flat_sh else jnp.asarray(value)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{source}: {len(extra)} tensors have no place in our model, e.g. {extra[:5]}")
  return flax.traverse_util.unflatten_dict(out)


def load_uvit(
  folder: PathLike,
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = np.float32,
  scan_layers: bool = True,
  variant: str | None = None,
  expect: Mapping[str, Any] | None = None,
  expect_source: str = "the config",
  shardings: Any = None,
) -> tuple[UVit2D, Any]:
  """Loads a diffusers ``UVit2DModel`` folder (an aMUSEd ``transformer/``).

  Args:
    folder: the ``transformer/`` folder, or an aMUSEd folder that contains one.
    dtype: computation dtype of the module.
    param_dtype: dtype of the params (e.g. ``jnp.bfloat16`` to halve memory).
    scan_layers: stack the transformer layers for ``nn.scan``.
    variant: weights file variant, e.g. ``"fp16"`` for
      ``diffusion_pytorch_model.fp16.safetensors``.
    expect: optional ``UVit2D`` fields the caller relies on (e.g. ``codebook_size``);
      a mismatch is an error naming both values and both sources.
    expect_source: names where ``expect`` came from, for that error.
    shardings: optional param-tree shardings (from ``abstract_params`` and the rules).

  Returns:
    ``(module, params)``; apply as ``module.apply({"params": params}, ids, ...)``.
  """
  folder = pathlib.Path(folder)
  if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
    folder = folder / "transformer"
  cfg_path = folder / "config.json"
  kwargs = uvit_kwargs_from_config(read_json(cfg_path), str(cfg_path))
  model = UVit2D(**kwargs, scan_layers=scan_layers, dtype=dtype, param_dtype=param_dtype)
  for key, want in (expect or {}).items():
    found = getattr(model, key)
    if found != want:
      raise ValueError(
        f"{key} mismatch: {expect_source} expects {want!r} but {cfg_path} has {found!r}"
      )
  stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
  tensors = SafetensorsFolder(folder, stems=(stem,))
  params = convert_params(
    tensors,
    abstract_params(model),
    source=str(folder),
    num_layers=model.num_hidden_layers,
    param_dtype=param_dtype,
    shardings=shardings,
  )
  return model, params
