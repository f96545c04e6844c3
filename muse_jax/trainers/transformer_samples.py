"""Sample grids for TensorBoard while a transformer trains (paper §2.8 decoding).

Every ``sample.every`` steps the trainer takes the first ``sample.num`` examples of the
current batch and generates their image ids from scratch with the real decode loop
(``muse_jax.sampling.decode``: all positions masked, ``sample.steps`` steps, guidance
ramped linearly to ``sample.guidance`` against the unconditional embedding; super-res
rows are conditioned on the example's low-res ids). The VQGAN named by
``sample.vq_checkpoint`` decodes the generated and the ground-truth ids to pixels, and
the grid shows ground truth (top row) above samples (bottom row).

All processes run the decode (the parameters are sharded over all of them); process 0
decodes to pixels and writes the image.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from muse_jax import partitioning, sampling
from muse_jax.models.transformer import MaskedTransformer
from muse_jax.trainers import common, token_batches


def make_sampler(
  config: ml_collections.ConfigDict, model: MaskedTransformer, mesh: jax.sharding.Mesh
):
  """Returns ``sampler(params, batch, step) -> {"samples": uint8 [2H, n W, 3]}``.

  Args:
    config: the trainer config (reads ``sample``, ``model``, ``text``, ``data``).
    model: the transformer being trained.
    mesh: the training mesh (the sampler's jit runs on it).
  """
  from muse_jax.vq_tokenizer import load_tokenizer

  s = config.sample
  if not s.vq_checkpoint:
    raise ValueError(
      "sample.every > 0 needs sample.vq_checkpoint (a VQGAN to decode ids to pixels)"
    )
  tokenizer = load_tokenizer(s.vq_checkpoint, expect={"codebook_size": model.vocab_size})
  superres = config.model.kind == "superres"
  uncond_emb, uncond_mask = (jnp.asarray(x) for x in token_batches.unconditional_text(config))
  h, w = model.grid
  n = s.num

  def generate(params, batch, rng):
    text_emb = batch["text_emb"][:n].astype(jnp.float32)
    text_mask = batch["text_mask"][:n]
    # Guidance: rows [0, n) conditional, [n, 2n) unconditional (the sampler's convention).
    emb2 = jnp.concatenate([text_emb, jnp.broadcast_to(uncond_emb, text_emb.shape)])
    mask2 = jnp.concatenate([text_mask, jnp.broadcast_to(uncond_mask, text_mask.shape)])
    extra = ()
    if superres:
      low = batch["low_res_ids"][:n]
      extra = (jnp.concatenate([low, low]),)

    def logits_fn(ids):
      return model.apply({"params": params}, ids, emb2, mask2, *extra)

    init = jnp.full((n, h * w), model.mask_id, jnp.int32)
    out = sampling.decode(
      init, logits_fn, rng, mask_id=model.mask_id, num_steps=s.steps, guidance_scale=s.guidance
    )
    return out.ids, batch["ids"][:n]

  generate_jit = jax.jit(generate, out_shardings=partitioning.replicated(mesh))

  def sampler(params: Any, batch: dict[str, jax.Array], step: int) -> dict[str, np.ndarray]:
    ids, truth = common.fetch(generate_jit(params, batch, jax.random.key(step)))
    if jax.process_index() != 0:
      return {}
    images = tokenizer.decode(np.concatenate([truth, ids]).reshape(2 * n, h, w))  # [2n, H, W, 3]
    rows = images.reshape(2, n, *images.shape[1:])  # [2, n, H, W, 3]
    grid = rows.transpose(0, 2, 1, 3, 4).reshape(2 * images.shape[1], n * images.shape[2], 3)
    return {"samples/truth_top_generated_bottom": grid}

  return sampler
