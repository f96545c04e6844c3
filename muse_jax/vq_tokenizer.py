"""A trained image tokenizer for the other stages: ``load_tokenizer(path) -> Tokenizer``.

Reads our `muse-jax train-vq` workdir (EMA parameters by default), a diffusers
``VQModel`` folder, or an aMUSEd pipeline folder (its ``vqvae/``), and wraps the model
with jit-compiled uint8 -> ids and ids -> uint8 functions.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from muse_jax import checkpointing, partitioning
from muse_jax.models.vqgan import VQGAN
from muse_jax.trainers.vqgan_config import make_model


class Tokenizer(NamedTuple):
  """A loaded image tokenizer: unpack as ``model, params = load_tokenizer(path)``."""

  model: VQGAN
  params: Any

  def with_convs(self, conv_impl: str, conv_dtype: Any = None) -> Tokenizer:
    """The same tokenizer computing its convs another way (``VQGAN.conv_impl`` and
    ``conv_dtype``; ``vq_convs.fast_convs`` picks them for a device); the params are shared."""
    return Tokenizer(self.model.clone(conv_impl=conv_impl, conv_dtype=conv_dtype), self.params)

  def encode(self, images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] (or floats already in ``model.input_range``) -> int32 ids [B, h, w]."""
    x = jnp.asarray(images)
    if x.dtype == jnp.uint8:
      lo, hi = self.model.input_range
      x = x.astype(jnp.float32) * ((hi - lo) / 255.0) + lo
    return _encode_jit(self.model, self.params, x)

  def decode(self, ids: np.ndarray | jax.Array) -> np.ndarray:
    """int ids [B, h, w] -> uint8 images [B, H, W, 3]."""
    x = _decode_jit(self.model, self.params, jnp.asarray(ids, jnp.int32))
    lo, hi = self.model.input_range
    return np.clip(np.round((np.asarray(x) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(model, params, x):
  return model.apply({"params": params}, x, method=model.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(model, params, ids):
  return model.apply({"params": params}, ids, method=model.decode)


def _vq_folder(path: pathlib.Path) -> pathlib.Path | None:
  """A diffusers VQModel folder at ``path`` or in its ``vqvae/`` (aMUSEd pipeline) subfolder."""
  for cand in (path, path / "vqvae"):
    cfg = cand / "config.json"
    if cfg.is_file():
      try:
        if json.loads(cfg.read_text()).get("_class_name") == "VQModel":
          return cand
      except json.JSONDecodeError:
        continue
  return None


def load_tokenizer(
  path: str | os.PathLike,
  *,
  use_ema: bool = True,
  step: int | None = None,
  expect: dict | None = None,
) -> Tokenizer:
  """Loads a tokenizer from our training workdir or a diffusers VQModel folder.

  Args:
    path: a ``train-vq`` workdir (or its ``checkpoints/``), a diffusers ``VQModel``
      folder, or an aMUSEd pipeline folder (its ``vqvae/``).
    use_ema: our checkpoints: the EMA params (default) or the raw ones.
    step: our checkpoints: a step other than the latest.
    expect: optional VQGAN fields the caller relies on (e.g. ``{"codebook_size": 8192}``);
      a mismatch is an error naming both values and where they come from.

  Returns:
    ``Tokenizer(model, params)`` with params on the default device(s).
  """
  p = pathlib.Path(path)
  folder = _vq_folder(p)
  if folder is not None:
    from muse_jax.convert.diffusers_vq import load_diffusers_vq

    model, params = load_diffusers_vq(folder, expect=expect, expect_source="the caller")
    return Tokenizer(model, params)
  ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
  cfg_file = ckpt_dir / checkpointing.CONFIG_FILE
  if not cfg_file.is_file():
    raise FileNotFoundError(
      f"{p}: neither a train-vq workdir (no {cfg_file}) nor a diffusers VQModel folder (no config.json"
      " with _class_name VQModel here or in vqvae/)"
    )
  config = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
  model = make_model(config.model)
  for key, want in (expect or {}).items():
    have = getattr(model, key)
    if (tuple(have) if isinstance(have, (list, tuple)) else have) != (
      tuple(want) if isinstance(want, (list, tuple)) else want
    ):
      raise ValueError(f"{key} mismatch: the caller expects {want!r} but {cfg_file} has {have!r}")
  x = jnp.zeros((1, model.downsample_factor, model.downsample_factor, 3), jnp.float32)
  abstract = partitioning.unbox_abstract(
    jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
  )
  key = "ema_params" if use_ema else "params"
  with checkpointing.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    restored = ckpt.restore_or_none({key: abstract}, step=step, partial=True)
  if restored is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint yet")
  params = jax.tree.map(jnp.asarray, restored.state[key])
  logging.info("Loaded tokenizer %s params of step %d from %s.", key, restored.step, ckpt_dir)
  return Tokenizer(model, params)
