"""The text-to-image cascade and editing, from a run's checkpoints (Muse §2, §3.3).

``MusePipeline.generate`` encodes the prompts once with the frozen text encoder, then

1. decodes 16x16 base tokens from all-masked ids with the base transformer
   (24 steps, guidance ramped linearly: the paper's defaults, §2.8);
2. if a super-resolution stage exists, decodes 64x64 tokens conditioned on the base
   tokens (8 steps, §2.4);
3. turns the last tokens into pixels with the matching VQ decoder.

Editing uses the same decode loop (§3.3). Inpainting and outpainting mask the tokens
under the edit region and decode only those, first on the base tokens, then, when a
super-res stage exists, on the high-res tokens conditioned on the inpainted base
tokens. Mask-free editing re-samples random base tokens toward the prompt
(``sampling.resample_edit``) and regenerates the high-res tokens under the changed
base tokens.

Each stage's decode is one jit-compiled function, cached by jax per stage, option set
and shape, so repeated calls of the same shapes do not recompile. The batch is split
over the devices of the pipeline's mesh (padded to a multiple of the shard count).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from muse_jax import editing, masking, partitioning, sampling
from muse_jax.stages import Stage
from muse_jax.text import TextEmbeddings, TextEncoder, concatenate
from muse_jax.trainers.vqgan import Tokenizer


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """Decode-loop settings of one stage (see ``sampling.decode``)."""

  num_steps: int = 24
  schedule: str = "cosine"
  temperature: float = 1.0
  choice_temperature: float | tuple[float, float] = 4.5
  top_k: int | None = None
  guidance_scale: float | None = 4.0  # t in (1 + t)·ℓc − t·ℓu; None: no guidance.
  guidance_schedule: str = "linear"  # "linear" ramp (paper) or "constant".

  def override(self, **changes: Any) -> SamplerOptions:
    """A copy with the given fields changed; ``None`` values leave a field as it is."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise TypeError(f"unknown sampler options {sorted(unknown)}")
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PAPER_BASE = SamplerOptions(num_steps=24)
PAPER_SUPERRES = SamplerOptions(num_steps=8)


@functools.partial(
  jax.jit,
  static_argnames=(
    "stage",
    "num_steps",
    "schedule",
    "choice_temperature",
    "top_k",
    "guidance_schedule",
  ),
)
def _decode_stage(
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
) -> jax.Array:
  logits_fn = _stage_logits_fn(stage, params, text, negative, low_res_ids)
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
  ).ids


@functools.partial(
  jax.jit, static_argnames=("stage", "num_iterations", "resample_fraction", "top_k")
)
def _edit_stage(
    stage, params, init_ids, text, negative, low_res_ids, rng, editable, temperature, guidance_scale,
    *, num_iterations, resample_fraction, top_k,
):  # fmt: skip
  logits_fn = _stage_logits_fn(stage, params, text, negative, low_res_ids)
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


def _stage_logits_fn(stage, params, text, negative, low_res_ids) -> sampling.LogitsFn:
  """The sampler's closure: B rows conditional; 2B rows [conditional; negative]."""
  batch = text.embeddings.shape[0]
  both = None if negative is None else concatenate([text, negative])
  low_both = None if low_res_ids is None else jnp.concatenate([low_res_ids, low_res_ids])

  def logits_fn(ids):
    if ids.shape[0] == batch:
      return stage.logits(params, ids, text, low_res_ids)
    return stage.logits(params, ids, both, low_both)

  return logits_fn


def _pad_rows(tree: Any, rows: int) -> Any:
  """Pads every array's leading axis to ``rows`` by repeating its last row."""

  def pad(x):
    if x is None or x.shape[0] == rows:
      return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], rows - x.shape[0], axis=0)])

  return jax.tree.map(pad, tree)


class MusePipeline:
  """Text-to-image generation and editing with a base (+ super-res) Muse cascade."""

  def __init__(
    self,
    *,
    tokenizer: Tokenizer,
    text_encoder: TextEncoder,
    base: tuple[Stage, Any],
    superres: tuple[Stage, Any] | None = None,
    superres_tokenizer: Tokenizer | None = None,
    base_options: SamplerOptions = PAPER_BASE,
    superres_options: SamplerOptions = PAPER_SUPERRES,
    mesh: jax.sharding.Mesh | None = None,
  ):
    """Assembles loaded parts; see ``muse_jax.run_loading.load_pipeline`` to load a run.

    Args:
      tokenizer: VQ tokenizer of the base stage's tokens.
      text_encoder: frozen text encoder the transformers were trained with.
      base: ``(stage, params)`` of the base transformer.
      superres: optional ``(stage, params)`` of the super-resolution transformer.
      superres_tokenizer: VQ tokenizer of the super-res tokens (required with ``superres``).
      base_options, superres_options: default sampler settings of each stage.
      mesh: devices to split the batch over (default: all, on the ``data`` axis).
    """
    self.tokenizer = tokenizer
    self.text_encoder = text_encoder
    self.base_stage, self.base_params = base
    self.superres_stage, self.superres_params = superres or (None, None)
    self.superres_tokenizer = superres_tokenizer
    self.base_options = base_options
    self.superres_options = superres_options
    self.mesh = mesh or partitioning.make_mesh()
    self._check_parts()

  # -- shapes ------------------------------------------------------------------

  def _check_parts(self) -> None:
    vq, stage = self.tokenizer.model, self.base_stage
    if vq.codebook_size != stage.codebook_size:
      raise ValueError(
        f"the tokenizer has {vq.codebook_size} codes but the base transformer predicts {stage.codebook_size}"
      )
    if self.superres_stage is not None:
      if self.superres_tokenizer is None:
        raise ValueError("a super-res stage needs its own (higher-resolution) tokenizer")
      sr_vq, sr = self.superres_tokenizer.model, self.superres_stage
      if sr_vq.codebook_size != sr.codebook_size:
        raise ValueError(
          f"the super-res tokenizer has {sr_vq.codebook_size} codes but the super-res "
          f"transformer predicts {sr.codebook_size}"
        )
      if tuple(sr.low_res_grid) != tuple(stage.grid):
        raise ValueError(
          f"the super-res stage expects low-res grid {sr.low_res_grid}; the base makes {stage.grid}"
        )

  @property
  def base_resolution(self) -> int:
    return self.base_stage.grid[0] * self.tokenizer.model.downsample_factor

  @property
  def resolution(self) -> int:
    """Side of the images this pipeline makes and edits."""
    if self.superres_stage is None:
      return self.base_resolution
    return self.superres_stage.grid[0] * self.superres_tokenizer.model.downsample_factor

  @property
  def _shards(self) -> int:
    return self.mesh.shape[partitioning.DATA] * self.mesh.shape[partitioning.FSDP]

  # -- text ----------------------------------------------------------------------

  def encode_prompts(
    self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None, guided: bool
  ) -> tuple[TextEmbeddings, TextEmbeddings | None]:
    """Embeds prompts, and the negatives (default: the empty prompt) when guided."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
    text = self.text_encoder.encode(list(prompts))
    if not guided:
      return text, None
    if negative_prompts is None:
      return text, self.text_encoder.unconditional(len(prompts))
    if isinstance(negative_prompts, str):
      negative_prompts = [negative_prompts] * len(prompts)
    if len(negative_prompts) != len(prompts):
      raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    return text, self.text_encoder.encode(list(negative_prompts))

  # -- the decode of one stage -----------------------------------------------------

  def _run(
    self,
    stage: Stage,
    params: Any,
    options: SamplerOptions,
    init_ids: np.ndarray,
    text: TextEmbeddings,
    negative: TextEmbeddings | None,
    low_res_ids: np.ndarray | None,
    rng: jax.Array,
  ) -> np.ndarray:
    """Decodes ``init_ids`` [B, L] (mask id where unknown); returns int32 [B, L]."""
    b = init_ids.shape[0]
    rows = math.ceil(b / self._shards) * self._shards
    args = _pad_rows((jnp.asarray(init_ids, jnp.int32), text, negative, low_res_ids), rows)
    args = partitioning.shard_batch(args, self.mesh)
    ids = _decode_stage(
      stage,
      params,
      *args,
      rng,
      jnp.float32(options.temperature),
      jnp.float32(options.guidance_scale or 0.0),
      num_steps=options.num_steps,
      schedule=options.schedule,
      choice_temperature=options.choice_temperature,
      top_k=options.top_k,
      guidance_schedule=options.guidance_schedule,
    )
    return np.asarray(ids)[:b]

  def _encode_image(self, tokenizer: Tokenizer, image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [S, S, 3] -> ids int32 [1, h·w] at ``size`` pixels."""
    if image.shape[0] != size:
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    ids = tokenizer.encode(image[None])
    return np.asarray(ids).reshape(1, -1)

  def _to_pixels(self, base_ids: np.ndarray, hr_ids: np.ndarray | None) -> np.ndarray:
    if hr_ids is None:
      h, w = self.base_stage.grid
      return self.tokenizer.decode(base_ids.reshape(-1, h, w))
    h, w = self.superres_stage.grid
    return self.superres_tokenizer.decode(hr_ids.reshape(-1, h, w))

  def _options(self, base: bool, overrides: dict[str, Any]) -> SamplerOptions:
    options = self.base_options if base else self.superres_options
    return options.override(**overrides)

  # -- text to image ----------------------------------------------------------------

  def generate_tokens(
    self,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | str | None = None,
    *,
    seed: int = 0,
    num_images_per_prompt: int = 1,
    superres_num_steps: int | None = None,
    **options: Any,
  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Like ``generate`` but returns the tokens: ``(base_ids [B, L], superres_ids or None)``."""
    prompts = (
      [p for p in prompts for _ in range(num_images_per_prompt)]
      if num_images_per_prompt > 1
      else prompts
    )
    if isinstance(negative_prompts, Sequence) and not isinstance(negative_prompts, str):
      negative_prompts = [p for p in negative_prompts for _ in range(num_images_per_prompt)]
    base_opts = self._options(True, options)
    sr_opts = self._options(False, {**options, "num_steps": superres_num_steps})
    text, negative = self.encode_prompts(
      prompts, negative_prompts, guided=base_opts.guidance_scale is not None
    )
    k_base, k_sr = jax.random.split(jax.random.key(seed))
    b = len(prompts)
    init = np.full((b, math.prod(self.base_stage.grid)), self.base_stage.mask_id, np.int32)
    base_ids = self._run(
      self.base_stage, self.base_params, base_opts, init, text, negative, None, k_base
    )
    if self.superres_stage is None:
      return base_ids, None
    init = np.full((b, math.prod(self.superres_stage.grid)), self.superres_stage.mask_id, np.int32)
    sr_negative = negative if sr_opts.guidance_scale is not None else None
    if sr_opts.guidance_scale is not None and negative is None:
      sr_negative = self.text_encoder.unconditional(b)
    hr_ids = self._run(
      self.superres_stage, self.superres_params, sr_opts, init, text, sr_negative, base_ids, k_sr
    )
    return base_ids, hr_ids

  def generate(
    self,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | str | None = None,
    *,
    seed: int = 0,
    num_images_per_prompt: int = 1,
    superres_num_steps: int | None = None,
    **options: Any,
  ) -> np.ndarray:
    """Generates images for ``prompts``.

    Args:
      prompts: B strings.
      negative_prompts: the guidance's unconditional side: one string, B strings, or
        None for the empty prompt.
      seed: the same seed and arguments give the same images.
      num_images_per_prompt: samples per prompt (B x n images, prompt-major).
      superres_num_steps: decode steps of the super-res stage (default 8).
      **options: ``SamplerOptions`` fields for the base stage, also applied to the
        super-res stage except ``num_steps``: num_steps, schedule, temperature,
        choice_temperature, top_k, guidance_scale, guidance_schedule.

    Returns:
      uint8 [B·n, S, S, 3] with S = ``self.resolution``.
    """
    base_ids, hr_ids = self.generate_tokens(
      prompts,
      negative_prompts,
      seed=seed,
      num_images_per_prompt=num_images_per_prompt,
      superres_num_steps=superres_num_steps,
      **options,
    )
    return self._to_pixels(base_ids, hr_ids)

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
    prompts = [prompt] * num_images
    negatives = None if negative_prompt is None else [negative_prompt] * num_images
    base_opts = self._options(True, options)
    sr_opts = self._options(False, {**options, "num_steps": None})
    text, negative = self.encode_prompts(
      prompts, negatives, guided=base_opts.guidance_scale is not None
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
    prompts = [prompt] * num_images
    negatives = None if negative_prompt is None else [negative_prompt] * num_images
    text, negative = self.encode_prompts(prompts, negatives, guided=guidance_scale is not None)
    k_base, k_sr = jax.random.split(jax.random.key(seed))
    low_ids = self._encode_image(self.tokenizer, image, self.base_resolution).repeat(num_images, 0)
    region = np.ones(s * s, bool).reshape(s, s) if mask is None else editing.check_mask(mask, s)
    editable = (
      editing.token_mask(region, s // self.base_stage.grid[0]).reshape(1, -1).repeat(num_images, 0)
    )
    b = num_images
    rows = math.ceil(b / self._shards) * self._shards
    args = _pad_rows((jnp.asarray(low_ids), text, negative, None, jnp.asarray(editable)), rows)
    init, text_p, negative_p, _, editable_p = partitioning.shard_batch(args, self.mesh)
    base_ids = _edit_stage(
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
    prompts = [prompt] * num_images
    negatives = None if negative_prompt is None else [negative_prompt] * num_images
    base_opts = self._options(True, options)
    sr_opts = self._options(False, {**options, "num_steps": None})
    text, negative = self.encode_prompts(
      prompts, negatives, guided=base_opts.guidance_scale is not None
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
    # As ``_run``, with the decode starting part-way.
    b = init.shape[0]
    rows = math.ceil(b / self._shards) * self._shards
    args = _pad_rows((jnp.asarray(init, jnp.int32), text, negative, low_res_ids), rows)
    args = partitioning.shard_batch(args, self.mesh)
    out = _decode_stage_from(
      stage,
      params,
      *args,
      k_decode,
      jnp.float32(options.temperature),
      jnp.float32(options.guidance_scale or 0.0),
      start_step=start_step,
      num_steps=n,
      schedule=options.schedule,
      choice_temperature=options.choice_temperature,
      top_k=options.top_k,
      guidance_schedule=options.guidance_schedule,
    )
    return np.asarray(out)[:b]


@functools.partial(
  jax.jit,
  static_argnames=(
    "stage", "start_step", "num_steps", "schedule", "choice_temperature", "top_k",
    "guidance_schedule",
  ),
)  # fmt: skip
def _decode_stage_from(
  stage, params, init_ids, text, negative, low_res_ids, rng, temperature, guidance_scale,
  *, start_step, num_steps, schedule, choice_temperature, top_k, guidance_schedule,
):  # fmt: skip
  """``_decode_stage`` continuing a schedule from ``start_step`` (img2img)."""
  logits_fn = _stage_logits_fn(stage, params, text, negative, low_res_ids)
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
