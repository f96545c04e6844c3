"""Decode stages: a token model seen by the pipeline as ``ids + text -> logits``.

The pipeline runs the same decode loop over different networks (Muse's base and
super-res transformers, aMUSEd's U-ViT). A stage adapts one network to the sampler's
``logits_fn`` contract and says what the loop needs to know: the token grid, the
mask id and the codebook size. Stages are frozen, hashable dataclasses holding the
(stateless) Flax module and no arrays, so a jit-compiled decode can take them as a
static argument and compile once per stage and shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from muse_jax import checkpointing, partitioning
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer
from muse_jax.text import TextEmbeddings


class Stage(Protocol):
  """What the pipeline needs from a token model."""

  @property
  def grid(self) -> tuple[int, int]: ...  # (h, w) of the ids it predicts.

  @property
  def mask_id(self) -> int: ...

  @property
  def codebook_size(self) -> int: ...  # K: logits are over [0, K).

  @property
  def needs_low_res(self) -> bool: ...

  @property
  def dtype(self) -> Any: ...  # computation dtype of its products (the tokenizers' follow it).

  def logits(
    self, params: Any, ids: jax.Array, text: TextEmbeddings, low_res_ids: jax.Array | None = None
  ) -> jax.Array: ...  # ids int32 [B, L] -> float32 [B, L, K]

  def abstract_params(self) -> Any: ...  # Boxed eval_shape tree (logical axis names).


@dataclasses.dataclass(frozen=True)
class MuseStage:
  """Muse's base (§2.3) or super-resolution (§2.4) masked transformer."""

  model: MaskedTransformer
  text_length: int  # T the model was trained with (for shape evaluation).
  text_dim: int  # Dt of the text encoder it was trained with.

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(self.model.grid)

  @property
  def mask_id(self) -> int:
    return self.model.mask_id

  @property
  def codebook_size(self) -> int:
    return self.model.vocab_size

  @property
  def needs_low_res(self) -> bool:
    return isinstance(self.model, SuperResTransformer)

  @property
  def dtype(self) -> Any:
    return self.model.dtype

  @property
  def low_res_grid(self) -> tuple[int, int] | None:
    return tuple(self.model.low_grid) if self.needs_low_res else None

  def logits(self, params, ids, text, low_res_ids=None):
    args = (ids, text.embeddings, text.mask)
    if self.needs_low_res:
      if low_res_ids is None:
        raise ValueError("the super-resolution stage needs low_res_ids")
      args += (low_res_ids,)
    return self.model.apply({"params": params}, *args).astype(jnp.float32)

  def abstract_params(self):
    b = 1
    args = [
      jnp.zeros((b, self.model.length), jnp.int32),
      jnp.zeros((b, self.text_length, self.text_dim), jnp.float32),
      jnp.ones((b, self.text_length), bool),
    ]
    if self.needs_low_res:
      args.append(jnp.zeros((b, self.low_res_grid[0] * self.low_res_grid[1]), jnp.int32))
    return jax.eval_shape(lambda: self.model.init(jax.random.key(0), *args)["params"])


def load_muse_stage(
  path: str | os.PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: partitioning.Rules = partitioning.DEFAULT_RULES,
  step: int | None = None,
) -> tuple[MuseStage, Any]:
  """Loads a base or super-res transformer from a ``muse-jax train`` workdir.

  Args:
    path: the workdir (or its ``checkpoints/`` folder), holding ``config.json``.
    mesh: restore the parameters straight into their shardings on this mesh
      (default: all devices on ``data``, i.e. replicated parameters).
    rules: logical-to-mesh rules for the parameters.
    step: a step other than the latest.

  Returns:
    ``(stage, params)``.
  """
  from muse_jax.trainers import transformer as trainer

  path = pathlib.Path(path)
  ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  cfg_file = ckpt_dir / checkpointing.CONFIG_FILE
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{path}: not a `muse-jax train` workdir (no {cfg_file})")
  config = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
  model = trainer.make_model(config.model)
  stage = MuseStage(model, text_length=config.text.length, text_dim=config.text.dim)
  mesh = mesh or partitioning.make_mesh()
  abstract = partitioning.sharded_abstract(stage.abstract_params(), mesh, rules)
  with checkpointing.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    restored = ckpt.restore_or_none({"params": abstract}, step=step, partial=True)
  if restored is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint yet")
  return stage, restored.state["params"]
