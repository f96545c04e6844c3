"""LPIPS / VGG16 perceptual-network weights from a local safetensors file (no download).

The file holds torchvision's ``vgg16().features`` tensors (``features.{i}.weight``
[O, I, 3, 3] and ``features.{i}.bias``) and, for LPIPS proper, its linear heads
(``lin{k}.model.1.weight`` [1, C, 1, 1], k = 0..4). One way to make it, once, on a
machine with torch, torchvision and the ``lpips`` package::

    import lpips, safetensors.torch
    from torchvision.models import VGG16_Weights, vgg16

    vgg = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features.state_dict()  # LPIPS's own VGG
    tensors = {f"features.{k}": v for k, v in vgg.items()}
    lin = lpips.LPIPS(net="vgg").state_dict()
    tensors.update({k: v for k, v in lin.items() if k.startswith("lin")})
    safetensors.torch.save_file(tensors, "lpips_vgg16.safetensors")

Point the VQ config's ``loss.perceptual_weights`` at that file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from muse_jax.convert.io import read_safetensors_header, read_tensor
from muse_jax.models.perceptual import LPIPS_TAPS, VGG16_CONVS


def load_lpips_params(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
  """Reads the perceptual network's params for ``models.perceptual.LPIPS``.

  Returns:
    ``(params, has_lin)``: the param tree, and whether the file held LPIPS's linear
    heads (otherwise build ``LPIPS(use_lin=False)``).

  Raises:
    FileNotFoundError: naming the path.
    KeyError / ValueError: naming the tensor, the shape found and the shape expected.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"perceptual-network weights not found at {path}")
  header, offset = read_safetensors_header(path)

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in header:
      raise KeyError(f"{path}: tensor {name!r} is missing (expected shape {shape})")
    arr = read_tensor(path, header[name], offset).astype(np.float32)
    if tuple(arr.shape) != shape:
      raise ValueError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}; expected {shape}")
    return arr

  vgg, cin = {}, 3
  for idx, width in VGG16_CONVS:
    w = get(f"features.{idx}.weight", (width, cin, 3, 3))
    vgg[f"features_{idx}"] = {
      "kernel": np.transpose(w, (2, 3, 1, 0)),
      "bias": get(f"features.{idx}.bias", (width,)),
    }
    cin = width
  params: dict[str, Any] = {"vgg": vgg}
  has_lin = "lin0.model.1.weight" in header
  if has_lin:
    widths = dict(VGG16_CONVS)
    for k, idx in enumerate(LPIPS_TAPS):
      params[f"lin{k}"] = get(f"lin{k}.model.1.weight", (1, widths[idx], 1, 1)).reshape(-1)
  return params, has_lin
