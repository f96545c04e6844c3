"""The text-to-image cascade and editing, from a run's checkpoints (Muse §2, §3.3).

``MusePipeline.generate`` encodes the prompts once with the frozen text encoder, then

1. decodes 16x16 base tokens from all-masked ids with the base transformer
   (24 steps, guidance ramped linearly: the paper's defaults, §2.8);
2. if a super-resolution stage exists, decodes 64x64 tokens conditioned on the base
   tokens (8 steps, §2.4);
3. turns the last tokens into pixels with the matching VQ decoder.

Editing (``pipeline_editing``: inpaint, outpaint, mask-free edit, img2img) uses the
same decode loop (§3.3).

Each stage's decode is one jit-compiled function (``stage_decode``), cached by jax per
stage, option set and shape, so repeated calls of the same shapes do not recompile. The
batch is split over the devices of the pipeline's mesh (padded to a multiple of the
shard count).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from muse_jax import partitioning
from muse_jax.pipeline_editing import EditingMixin
from muse_jax.stage_decode import decode_stage, pad_rows
from muse_jax.stages import Stage
from muse_jax.text import TextEmbeddings, TextEncoder
from muse_jax.vq_tokenizer import Tokenizer


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


class MusePipeline(EditingMixin):
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
    start_step: int = 0,
  ) -> np.ndarray:
    """Decodes ``init_ids`` [B, L] (mask id where unknown) from ``start_step``; returns
    int32 [B, L]."""
    b = init_ids.shape[0]
    rows = math.ceil(b / self._shards) * self._shards
    args = pad_rows((jnp.asarray(init_ids, jnp.int32), text, negative, low_res_ids), rows)
    args = partitioning.shard_batch(args, self.mesh)
    ids = decode_stage(
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
      start_step=start_step,
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
