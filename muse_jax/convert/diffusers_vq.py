"""diffusers ``VQModel`` folders (aMUSEd's tokenizer) -> our ``VQGAN`` params, without torch.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded
index). ``vqgan_kwargs_from_config`` turns the config into ``VQGAN`` fields that express
diffusers' model exactly:

  block_out_channels -> channels          layers_per_block -> num_res_blocks
  (decoder: layers_per_block + 1 blocks)  downsample "conv" (stride 2, (0,1) padding)
  mid_block_add_attention -> mid_attention (mid block: 2 resnets)
  latent_channels, vq_embed_dim -> embed_dim, use_quant_conv=True, norm eps 1e-6
  num_vq_embeddings -> codebook_size      norm_num_groups -> norm_groups

Weights are matched by walking *our* parameter tree and naming the torch tensor each
leaf comes from (``encoder/down_blocks_0_resnets_1/conv1/kernel`` <-
``encoder.down_blocks.0.resnets.1.conv1.weight``), so a missing or extra tensor, or a
shape mismatch, is an error that names both sides. Conv kernels go from torch
[O, I, kh, kw] to HWIO; linear weights [out, in] are transposed.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.convert.io import SafetensorsFolder, read_json
from muse_jax.models.vqgan import VQGAN
from muse_jax.partitioning import unbox_abstract

PathLike = str | os.PathLike

AMUSED_INPUT_RANGE = (0.0, 1.0)  # aMUSEd's VaeImageProcessor(do_normalize=False)


def vqgan_kwargs_from_config(cfg: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
  """``VQGAN`` keyword arguments equivalent to a diffusers ``VQModel`` config.

  Raises:
    ValueError: for options our module cannot express, naming the value found.
  """
  cls = cfg.get("_class_name", "VQModel")
  if cls != "VQModel":
    raise ValueError(f"{source}: _class_name is {cls!r}; expected 'VQModel'")
  channels = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
  down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
  up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
  checks = [
    ("down_block_types", down, ["DownEncoderBlock2D"] * len(channels)),
    ("up_block_types", up, ["UpDecoderBlock2D"] * len(channels)),
    ("norm_type", cfg.get("norm_type", "group"), "group"),
  ]
  for key, found, expected in checks:
    if found != expected:
      raise ValueError(f"{source}: {key} is {found!r}; only {expected!r} is supported")
  act = cfg.get("act_fn", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{source}: act_fn is {act!r}; only 'silu' is supported")
  latent = int(cfg.get("latent_channels", 3))
  layers = int(cfg.get("layers_per_block", 1))
  return dict(
    channels=channels,
    num_res_blocks=layers,
    decoder_num_res_blocks=layers + 1,
    mid_num_res_blocks=2,
    mid_attention=bool(cfg.get("mid_block_add_attention", True)),
    downsample="conv",
    latent_channels=latent,
    embed_dim=int(cfg.get("vq_embed_dim") or latent),
    use_quant_conv=True,
    codebook_size=int(cfg.get("num_vq_embeddings", 256)),
    l2_normalize=False,
    in_channels=int(cfg.get("in_channels", 3)),
    out_channels=int(cfg.get("out_channels", 3)),
    norm_groups=int(cfg.get("norm_num_groups", 32)),
    norm_eps=1e-6,
  )


def torch_name(path: tuple[str, ...]) -> str:
  """Our param path -> diffusers state-dict key."""
  *mods, leaf = path
  parts = []
  for m in mods:
    m = re.sub(r"_(\d+)(?=_|$)", r".\1", m)  # down_blocks_0_resnets_1 -> down_blocks.0_resnets.1
    parts.append(re.sub(r"(\d)_", r"\1.", m))  # -> down_blocks.0.resnets.1
  if path[-2:] == ("quantize", "embedding"):
    return "quantize.embedding.weight"
  suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ".".join([*parts, suffix])


def _to_ours(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return np.transpose(arr, (2, 3, 1, 0))  # [O, I, kh, kw] -> [kh, kw, I, O]
  if leaf == "kernel" and arr.ndim == 2:
    return arr.T  # [out, in] -> [in, out]
  return arr


def convert_params(
  tensors: Mapping[str, np.ndarray],
  abstract_params: Any,
  source: str = "checkpoint",
  shardings: Any = None,
  dtype: Any = jnp.float32,
) -> Any:
  """Fills our parameter tree from a diffusers state dict.

  Args:
    tensors: torch name -> array (e.g. a ``SafetensorsFolder``; read lazily, one by one).
    abstract_params: our (unboxed) param tree or its ``eval_shape``; gives names and shapes.
    source: where the tensors come from, for errors.
    shardings: optional matching tree of shardings; each leaf is placed as it is read.
    dtype: parameter dtype.

  Returns:
    The param tree (jax arrays).

  Raises:
    KeyError / ValueError naming both names and shapes on a mismatch.
  """
  flat = flax.traverse_util.flatten_dict(abstract_params)
  flat_sh = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
  used, out = set(), {}
  for path, leaf in flat.items():
    name = torch_name(path)
    if name not in tensors:
      raise KeyError(f"{source}: tensor {name!r} (for our parameter {'/'.join(path)}) is missing")
    arr = _to_ours(np.asarray(tensors[name]), path[-1])
    if tuple(arr.shape) != tuple(leaf.shape):
      raise ValueError(
        f"{source}: tensor {name!r} has shape {tuple(np.asarray(tensors[name]).shape)} (as ours:"
        f" {tuple(arr.shape)}); our parameter {'/'.join(path)} expects {tuple(leaf.shape)}"
      )
    arr = np.asarray(arr, dtype=np.float32).astype(dtype)
    out[path] = jax.device_put(arr, flat_sh[path]) if path in flat_sh else jnp.asarray(arr)
    used.add(name)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{source}: {len(extra)} tensors have no place in our model, e.g. {extra[:5]}")
  return flax.traverse_util.unflatten_dict(out)


def load_diffusers_vq(
  folder: PathLike,
  expect: Mapping[str, Any] | None = None,
  expect_source: str = "the config",
  input_range: tuple[float, float] = AMUSED_INPUT_RANGE,
  dtype: Any = jnp.float32,
  shardings: Any = None,
) -> tuple[VQGAN, Any]:
  """Loads a diffusers VQModel folder.

  Args:
    folder: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``.
    expect: optional VQGAN fields the caller relies on (e.g. ``codebook_size``); a
      mismatch is an error naming both values and both sources.
    expect_source: names where ``expect`` came from, for that error.
    input_range: the pixel range the encoder expects (aMUSEd: [0, 1]).
    dtype: compute dtype of the returned module (params stay float32).
    shardings: optional param-tree shardings.

  Returns:
    ``(module, params)``.
  """
  folder = os.fspath(folder)
  cfg_path = os.path.join(folder, "config.json")
  cfg = read_json(cfg_path)
  kwargs = vqgan_kwargs_from_config(cfg, cfg_path)
  for key, want in (expect or {}).items():
    if key in kwargs and _norm(kwargs[key]) != _norm(want):
      raise ValueError(
        f"{key} mismatch: {expect_source} expects {want!r} but {cfg_path} (with its weights) has {kwargs[key]!r}"
      )
  model = VQGAN(**kwargs, input_range=tuple(input_range), dtype=dtype)
  tensors = SafetensorsFolder(folder, stems=("diffusion_pytorch_model", "model"))
  weights_name = f"{folder}/diffusion_pytorch_model.safetensors"
  cb_shape = (
    tensors.shape("quantize.embedding.weight") if "quantize.embedding.weight" in tensors else None
  )
  if cb_shape is not None and tuple(cb_shape) != (kwargs["codebook_size"], kwargs["embed_dim"]):
    raise ValueError(
      f"codebook mismatch: {cfg_path} says num_vq_embeddings={kwargs['codebook_size']}, "
      f"vq_embed_dim={kwargs['embed_dim']} but {weights_name} holds a codebook of shape {tuple(cb_shape)}"
    )
  abstract = abstract_params(model)
  params = convert_params(
    tensors, abstract, source=f"{weights_name} (config {cfg_path})", shardings=shardings
  )
  return model, params


def abstract_params(model: VQGAN, image_size: int | None = None) -> Any:
  """Shape/dtype tree of the module's params (no compute)."""
  size = image_size or model.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return unbox_abstract(tree)["params"]


def _norm(v: Any) -> Any:
  return tuple(v) if isinstance(v, (list, tuple)) else v
