"""One stage's jit-compiled decode, shared by generation and every kind of editing.

A stage (``muse_jax.stages``) is a static argument, so each stage, option set and
shape compiles once and is reused. Guidance scale and temperature are traced: changing
them does not recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from muse_jax import sampling
from muse_jax.stages import Stage
from muse_jax.text import TextEmbeddings, concatenate


@functools.partial(
  jax.jit,
  static_argnames=(
    "stage",
    "num_steps",
    "schedule",
    "choice_temperature",
    "top_k",
    "guidance_schedule",
    "start_step",
  ),
)
def decode_stage(
  stage: Stage,
  params: Any,
  init_ids: jax.Array,  # int32 [B, L]
  text: TextEmbeddings,  # [B, ...]
  negative: TextEmbeddings | None,  # [B, ...]; None: no guidance
  low_res_ids: jax.Array | None,  # int32 [B, l] for super-res
  rng: jax.Array,
  temperature: jax.Array,
  guidance_scale: jax.Array,
  *,
  num_steps: int,
  schedule: str,
  choice_temperature: float | tuple[float, float],
  top_k: int | None,
  guidance_schedule: str,
  start_step: int = 0,
) -> jax.Array:
  logits_fn = stage_logits_fn(stage, params, text, negative, low_res_ids)
  return sampling.decode(
    init_ids,
    logits_fn,
    rng,
    mask_id=stage.mask_id,
    num_steps=num_steps,
    schedule=schedule,
    temperature=temperature,
    choice_temperature=choice_temperature,
    top_k=top_k,
    guidance_scale=None if negative is None else guidance_scale,
    guidance_schedule=guidance_schedule,
    start_step=start_step,
  ).ids


def stage_logits_fn(stage, params, text, negative, low_res_ids) -> sampling.LogitsFn:
  """The sampler's closure: B rows conditional; 2B rows [conditional; negative]."""
  batch = text.embeddings.shape[0]
  both = None if negative is None else concatenate([text, negative])
  low_both = None if low_res_ids is None else jnp.concatenate([low_res_ids, low_res_ids])

  def logits_fn(ids):
    if ids.shape[0] == batch:
      return stage.logits(params, ids, text, low_res_ids)
    return stage.logits(params, ids, both, low_both)

  return logits_fn


def pad_rows(tree: Any, rows: int) -> Any:
  """Pads every array's leading axis to ``rows`` by repeating its last row."""

  def pad(x):
    if x is None or x.shape[0] == rows:
      return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], rows - x.shape[0], axis=0)])

  return jax.tree.map(pad, tree)


@functools.partial(
  jax.jit, static_argnames=("stage", "num_iterations", "resample_fraction", "top_k")
)
def edit_stage(
    stage, params, init_ids, text, negative, low_res_ids, rng, editable, temperature, guidance_scale,
    *, num_iterations, resample_fraction, top_k,
):  # fmt: skip
  logits_fn = stage_logits_fn(stage, params, text, negative, low_res_ids)
  return sampling.resample_edit(
    init_ids,
    logits_fn,
    rng,
    mask_id=stage.mask_id,
    num_iterations=num_iterations,
    resample_fraction=resample_fraction,
    top_k=top_k,
    temperature=temperature,
    guidance_scale=None if negative is None else guidance_scale,
    editable=editable,
  ).ids
