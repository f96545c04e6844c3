"""Batches for the demo's decoder: shapes images, with their tokens partly re-predicted by the base.

The decoder that turns the base transformer's tokens into pixels only ever saw an
encoder's tokens. The base's sampled grids hold other codes, near but not equal to a real
image's, and a decoder trained on clean codes draws those faithfully: as ragged shapes.
So the demo trains the decoder again (paper §2.5's finetuning, encoder and codebook
frozen) on what the base itself makes of real images:

1. render a training image and encode its tokens ``ids`` [h, w];
2. mask a random share of them (rate uniform in [min_rate, max_rate]);
3. fill the masked tokens with the trained base's samples, given the image's caption, in
   one parallel step at ``temperature``;
4. the decoder learns to draw the real image from that grid.

A pool of ``pool`` images x ``rounds`` fills is made once (about 9 s of the demo's
stage for 1024 x 2 on 2 cores, loading included); batches are then drawn from it at
random.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from muse_jax import partitioning, stages
from muse_jax.text import TextEncoder
from muse_jax.vq_tokenizer import load_tokenizer

_CHUNK = 256  # images encoded and refilled per call


class RefilledBatches:
  """``next()`` -> ``{"image": uint8 [b, S, S, 3], "ids": int32 [b, h, w]}``, for the VQ trainer."""

  def __init__(
    self,
    source,  # shapes examples: source[i] -> {"image", "caption"}
    tokenizer_dir: pathlib.Path,
    text_dir: pathlib.Path,
    text_max_length: int,
    base_dir: pathlib.Path,
    options: ml_collections.ConfigDict,  # pool, rounds, min_rate, max_rate, temperature
    batch_size: int,
    seed: int,
  ):
    if not 0.0 <= options.min_rate <= options.max_rate <= 1.0:
      raise ValueError(
        f"refill rates [{options.min_rate}, {options.max_rate}]; expected 0 <= min <= max <= 1"
      )
    mesh = partitioning.make_mesh(devices=jax.local_devices())
    tokenizer = load_tokenizer(tokenizer_dir)
    text_encoder = TextEncoder.from_pretrained(text_dir, max_length=text_max_length, mesh=mesh)
    stage, params = stages.load_muse_stage(str(base_dir), mesh=mesh)

    @jax.jit
    def refill(params, ids, text, rate_key, mask_key, pick_key):  # ids int32 [n, L]
      rate = jax.random.uniform(rate_key, (ids.shape[0], 1), minval=options.min_rate,
                                maxval=options.max_rate)  # fmt: skip
      masked = jax.random.uniform(mask_key, ids.shape) < rate  # [n, L]
      logits = stage.logits(params, jnp.where(masked, stage.mask_id, ids), text)  # [n, L, K]
      guess = jax.random.categorical(pick_key, logits / options.temperature)
      return jnp.where(masked, guess, ids)

    key = jax.random.key(seed)
    images, fills = [], []
    with tqdm.tqdm(total=options.pool, desc="refill", unit="img") as bar:
      for start in range(0, options.pool, _CHUNK):
        examples = [source[i] for i in range(start, min(start + _CHUNK, options.pool))]
        pictures = np.stack([e["image"] for e in examples])  # uint8 [n, S, S, 3]
        ids = jnp.asarray(tokenizer.encode(pictures)).reshape(len(examples), -1)  # [n, L]
        text = text_encoder.encode([e["caption"] for e in examples])
        rounds = []
        for _ in range(options.rounds):
          key, *round_keys = jax.random.split(key, 4)
          rounds.append(np.asarray(refill(params, ids, text, *round_keys)))
        images.append(pictures)
        fills.append(np.stack(rounds, axis=1))  # [n, rounds, L]
        bar.update(len(examples))
    self.images = np.concatenate(images)
    grid = self.images.shape[1] // tokenizer.model.downsample_factor
    self.fills = np.concatenate(fills).reshape(len(self.images), options.rounds, grid, grid)
    self.batch_size = batch_size
    self.rng = np.random.default_rng(seed)

  def __iter__(self) -> RefilledBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    pick = self.rng.integers(0, len(self.images), self.batch_size)
    fill = self.rng.integers(0, self.fills.shape[1], self.batch_size)
    return {"image": self.images[pick], "ids": self.fills[pick, fill].astype(np.int32)}
