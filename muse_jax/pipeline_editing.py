"""Editing on the shared decode loop (Muse §3.3), as methods of ``MusePipeline``.

Inpainting and outpainting mask the tokens under the edit region and decode only those:
first the base tokens, then, with a super-res stage, the high-res tokens conditioned on
the inpainted base tokens. Mask-free editing re-samples random base tokens toward the
prompt (``sampling.resample_edit``) and regenerates the high-res tokens under the
changed base tokens. img2img re-masks a random share of an image's tokens and decodes
from part-way through the schedule, as aMUSEd defines it.

The mixin relies on ``MusePipeline``'s stages, tokenizers, ``_run`` and helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import editing, masking, partitioning
from muse_jax.stage_decode import edit_stage, pad_rows


class EditingMixin:
  """Inpaint, outpaint, mask-free edit and img2img for ``MusePipeline``."""

  # -- editing --------------------------------------------------------------------

  def inpaint_tokens(
    self,
    image: np.ndarray,
    mask: np.ndarray,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    **options: Any,
  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Inpainting on tokens: ``(base_ids, superres_ids, known_base, known_superres)``.

    ``known_*`` are bool [L] masks of the tokens kept from the image.
    """
    s = self.resolution
    image = editing.check_image(image, s)
    pixel_mask = editing.check_mask(mask, s)
    base_opts, sr_opts = self._edit_options(options)
    text, negative = self._encode_repeated(
      prompt, negative_prompt, num_images, guided=base_opts.guidance_scale is not None
    )
    k_base, k_sr = jax.random.split(jax.random.key(seed))

    low_mask = editing.token_mask(pixel_mask, s // self.base_stage.grid[0]).reshape(-1)
    low_ids = self._encode_image(self.tokenizer, image, self.base_resolution)
    init = np.where(low_mask, self.base_stage.mask_id, low_ids).repeat(num_images, 0)
    base_ids = self._run(
      self.base_stage, self.base_params, base_opts, init, text, negative, None, k_base
    )
    if self.superres_stage is None:
      return base_ids, None, ~low_mask, None
    hr_mask = editing.token_mask(pixel_mask, s // self.superres_stage.grid[0]).reshape(-1)
    hr_ids = self._encode_image(self.superres_tokenizer, image, s)
    init = np.where(hr_mask, self.superres_stage.mask_id, hr_ids).repeat(num_images, 0)
    if sr_opts.guidance_scale is not None and negative is None:
      negative = self.text_encoder.unconditional(num_images)
    hr = self._run(
      self.superres_stage,
      self.superres_params,
      sr_opts,
      init,
      text,
      negative if sr_opts.guidance_scale is not None else None,
      base_ids,
      k_sr,
    )
    return base_ids, hr, ~low_mask, ~hr_mask

  def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, **kwargs: Any) -> np.ndarray:
    """Regenerates the masked region of ``image`` to match ``prompt`` (§3.3).

    Args:
      image: uint8 [S, S, 3], S = ``self.resolution``.
      mask: [S, S] bool (or 0/1, or 0/255), True where to regenerate.
      prompt: the text for the region (and the whole image).
      **kwargs: negative_prompt, num_images, seed, and ``SamplerOptions`` fields.

    Returns:
      uint8 [num_images, S, S, 3].
    """
    base_ids, hr_ids, _, _ = self.inpaint_tokens(image, mask, prompt, **kwargs)
    return self._to_pixels(base_ids, hr_ids)

  def outpaint(
    self,
    image: np.ndarray,
    prompt: str,
    *,
    directions: str | Sequence[str] = "right",
    size: int | None = None,
    **kwargs: Any,
  ) -> np.ndarray:
    """Extends ``image`` beyond its borders: shifts it away from ``directions`` by
    ``size`` pixels (default a quarter of the image) and inpaints the new border."""
    s = self.resolution
    image = editing.check_image(image, s)
    token = s // self.base_stage.grid[0]  # border in whole base tokens
    canvas, mask = editing.outpaint_canvas(image, directions, size or s // 4, multiple=token)
    return self.inpaint(canvas, mask, prompt, **kwargs)

  def edit(
    self,
    image: np.ndarray,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    num_iterations: int = 100,
    resample_fraction: float = 0.08,
    top_k: int | None = 3,
    guidance_scale: float | None = 4.0,
    temperature: float = 1.0,
    mask: np.ndarray | None = None,
  ) -> np.ndarray:
    """Mask-free editing (§3.3): re-samples the image's tokens toward ``prompt``.

    The paper's settings are the defaults: 8% of the tokens per iteration, 100
    iterations, guidance 4, top-k 3. With a super-res stage, the high-res tokens under
    changed base tokens are then regenerated conditioned on the edited base tokens.

    Args:
      image: uint8 [S, S, 3].
      prompt: the target text.
      negative_prompt: guidance's unconditional side (default: the empty prompt).
      num_images: samples.
      seed: random seed.
      num_iterations, resample_fraction, top_k, guidance_scale, temperature: the
        resampler's settings (``sampling.resample_edit``).
      mask: optional [S, S] region that may change (default: the whole image).

    Returns:
      uint8 [num_images, S, S, 3].
    """
    s = self.resolution
    image = editing.check_image(image, s)
    text, negative = self._encode_repeated(
      prompt, negative_prompt, num_images, guided=guidance_scale is not None
    )
    k_base, k_sr = jax.random.split(jax.random.key(seed))
    low_ids = self._encode_image(self.tokenizer, image, self.base_resolution).repeat(num_images, 0)
    region = np.ones(s * s, bool).reshape(s, s) if mask is None else editing.check_mask(mask, s)
    editable = (
      editing.token_mask(region, s // self.base_stage.grid[0]).reshape(1, -1).repeat(num_images, 0)
    )
    b = num_images
    rows = math.ceil(b / self._shards) * self._shards
    args = pad_rows((jnp.asarray(low_ids), text, negative, None, jnp.asarray(editable)), rows)
    init, text_p, negative_p, _, editable_p = partitioning.shard_batch(args, self.mesh)
    base_ids = edit_stage(
      self.base_stage,
      self.base_params,
      init,
      text_p,
      negative_p,
      None,
      k_base,
      editable_p,
      jnp.float32(temperature),
      jnp.float32(guidance_scale or 0.0),
      num_iterations=num_iterations,
      resample_fraction=resample_fraction,
      top_k=top_k,
    )
    base_ids = np.asarray(base_ids)[:b]
    if self.superres_stage is None:
      return self._to_pixels(base_ids, None)
    changed = (base_ids != low_ids).reshape(b, *self.base_stage.grid)
    hr_changed = np.stack(
      [editing.upsample_token_mask(c, self.superres_stage.grid) for c in changed]
    )
    hr_ids = self._encode_image(self.superres_tokenizer, image, s).repeat(b, 0)
    init = np.where(hr_changed.reshape(b, -1), self.superres_stage.mask_id, hr_ids)
    sr_opts = self.superres_options
    sr_negative = None
    if sr_opts.guidance_scale is not None:
      sr_negative = negative if negative is not None else self.text_encoder.unconditional(b)
    hr = self._run(
      self.superres_stage, self.superres_params, sr_opts, init, text, sr_negative, base_ids, k_sr
    )
    return self._to_pixels(base_ids, hr)

  # -- img2img (aMUSEd) -------------------------------------------------------------

  def img2img_tokens(
    self,
    image: np.ndarray,
    prompt: str,
    *,
    strength: float = 0.5,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    **options: Any,
  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Like ``img2img`` but returns the tokens: ``(base_ids [n, L], superres_ids or None)``."""
    if not 0.0 < strength <= 1.0:
      raise ValueError(f"strength must be in (0, 1]; got {strength}")
    s = self.resolution
    image = editing.check_image(image, s)
    base_opts, sr_opts = self._edit_options(options)
    text, negative = self._encode_repeated(
      prompt, negative_prompt, num_images, guided=base_opts.guidance_scale is not None
    )
    k_base, k_sr = jax.random.split(jax.random.key(seed))
    low_ids = self._encode_image(self.tokenizer, image, self.base_resolution)
    base_ids = self._renoise_and_decode(
      self.base_stage, self.base_params, base_opts, strength, low_ids.repeat(num_images, 0),
      text, negative, None, k_base,
    )  # fmt: skip
    if self.superres_stage is None:
      return base_ids, None
    hr_ids = self._encode_image(self.superres_tokenizer, image, s).repeat(num_images, 0)
    sr_negative = None
    if sr_opts.guidance_scale is not None:
      sr_negative = (
        negative if negative is not None else self.text_encoder.unconditional(num_images)
      )
    hr = self._renoise_and_decode(
      self.superres_stage, self.superres_params, sr_opts, strength, hr_ids, text, sr_negative,
      base_ids, k_sr,
    )  # fmt: skip
    return base_ids, hr

  def img2img(self, image: np.ndarray, prompt: str, **kwargs: Any) -> np.ndarray:
    """Re-generates part of ``image`` toward ``prompt`` (aMUSEd's img2img).

    The image's tokens are "noised" the way a masked model noises: a random
    ⌊L·γ(s/N)⌋ of them are masked, as if decoding had reached step
    ``s = N − int(N·strength)`` of N, and decoding continues from step s
    (``sampling.decode(start_step=s)``), so strength 1 regenerates everything and
    small strengths keep most tokens. With a super-res stage its tokens are noised
    and re-decoded the same way, conditioned on the new base tokens.

    Differences from diffusers' ``AmusedImg2ImgPipeline`` (same expected count):
    diffusers masks each token with probability γ(s/N) (a binomial count, one mask
    shared by all images of a prompt) and keeps ⌊L·γ((i+1)/N)⌋ masked after step i;
    this masks exactly n₀ = ⌊L·γ(s/N)⌋ tokens, drawn per image, and keeps
    ⌊n₀·γ((i+1)/N)/γ(s/N)⌋, which is never more and at most one fewer. At
    strength 1 diffusers' noise step index wraps around to the last step and masks
    (almost) no token; here strength 1 masks all of them, as documented there.

    Args:
      image: uint8 [S, S, 3], S = ``self.resolution``.
      prompt: the target text.
      **kwargs: strength (in (0, 1]; default 0.5; at least 1/N so that one step
        runs), negative_prompt, num_images, seed, and ``SamplerOptions`` fields.

    Returns:
      uint8 [num_images, S, S, 3].
    """
    base_ids, hr_ids = self.img2img_tokens(image, prompt, **kwargs)
    return self._to_pixels(base_ids, hr_ids)

  def _edit_options(self, options: dict[str, Any]):
    """Base and super-res sampler options of an edit (super-res keeps its own step count)."""
    return self._options(True, options), self._options(False, {**options, "num_steps": None})

  def _encode_repeated(
    self, prompt: str, negative_prompt: str | None, num_images: int, guided: bool
  ):
    """One prompt (and its negative) encoded once per sample: ``(text, negative)``."""
    negatives = None if negative_prompt is None else [negative_prompt] * num_images
    return self.encode_prompts([prompt] * num_images, negatives, guided=guided)

  def _renoise_and_decode(
    self, stage, params, options, strength, ids, text, negative, low_res_ids, rng
  ) -> np.ndarray:
    """Masks ⌊L·γ(s/N)⌋ random tokens per row of ``ids`` [B, L] and decodes from step s."""
    n = options.num_steps
    start_step = n - int(n * strength)
    if start_step >= n:
      raise ValueError(
        f"strength {strength} runs int({n} * {strength}) = 0 of the {n} decoding steps; "
        f"use strength >= 1/{n}"
      )
    length = ids.shape[1]
    count = int(np.floor(length * masking.ratio_table(options.schedule, n)[start_step]))
    k_mask, k_decode = jax.random.split(rng)
    masked = masking.random_mask(k_mask, jnp.full((ids.shape[0],), count), length)
    init = np.where(np.asarray(masked), stage.mask_id, ids)
    return self._run(
      stage, params, options, init, text, negative, low_res_ids, k_decode, start_step
    )
