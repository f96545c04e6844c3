"""aMUSEd in the Muse pipeline: the U-ViT as a decode stage, and aMUSEd's sampling semantics.

aMUSEd (Patil et al. 2024, arXiv 2401.01808) is the open Muse-style model: its U-ViT
(``muse_jax.models.uvit``) predicts VQ tokens from CLIP-L/14 text, decoded by Muse's
parallel decoding (Chang et al. 2023, §2.8). This module adapts it to the pipeline:

* ``AmusedStage``: the ``stages.Stage`` of a ``UVit2D``: ids ``[B, L]`` <-> the token
  grid, channels-last logits over the codebook, the penultimate CLIP hidden states as
  cross-attention context, the pooled projection plus the micro-conditioning
  (original width, original height, crop top, crop left, aesthetic score) for AdaLN;
* ``AMUSED_SAMPLER``: diffusers' ``AmusedPipeline`` defaults as ``SamplerOptions``;
* ``amused_inpaint_mask``: how ``AmusedInpaintPipeline`` turns a mask image into
  masked tokens;
* ``load_amused_stage``: the U-ViT of a ``muse-jax convert amused`` run (an orbax
  checkpoint), or straight from a diffusers ``transformer/`` folder.

How diffusers' settings map onto ours (``AmusedPipeline.__call__`` and
``AmusedScheduler``, diffusers 0.3x-0.4x):

* guidance: diffusers forms ``ℓu + g·(ℓc − ℓu)`` = ``(1 + t)·ℓc − t·ℓu`` with
  ``t = g − 1``, and only when ``g > 1``; its default ``g = 10`` is our constant
  ``t = 9``. The unconditional side is the empty prompt (or a negative prompt), as ours.
* the scheduler's ``temperature=(2, 0)`` is the weight of the Gumbel noise in the
  confidence, ``linspace(2, 0, N)[i]`` at step i: our ``choice_temperature=(2, 0)``.
  Tokens are drawn from ``softmax(ℓ)`` itself: our ``temperature=1``.
* after step i, ``max(1, min(n − 1, ⌊L·γ((i+1)/N)⌋))`` tokens stay masked, γ the
  cosine schedule, none after the last step: ``sampling.num_masked_after`` for a full
  generation (n₀ = L).
* micro-conditioning ``[width, height, crop[0], crop[1], aesthetic]`` with the output
  size in pixels, crop (0, 0) and aesthetic score 6.
* img2img and inpainting: see ``MusePipeline.img2img`` and ``amused_inpaint_mask``.
  ``AmusedInpaintPipeline`` switches its scheduler to the *linear* schedule
  (``AMUSED_INPAINT_SAMPLER``), relative to the masked tokens (its
  ``starting_mask_ratio``), which is how our ``inpaint`` counts.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import checkpointing, partitioning
from muse_jax.convert.diffusers_uvit import load_uvit, uvit_kwargs_from_config
from muse_jax.convert.io import read_json
from muse_jax.models.uvit import UVit2D, cast_kernels, fast_attention, unstack_layers
from muse_jax.pipeline import SamplerOptions
from muse_jax.text import TextEmbeddings

PathLike = str | os.PathLike

# diffusers' AmusedPipeline defaults: 12 steps, guidance_scale 10 (t = 9, constant),
# scheduler temperature (2, 0) on the confidence noise, cosine schedule.
AMUSED_SAMPLER = SamplerOptions(
  num_steps=12,
  schedule="cosine",
  temperature=1.0,
  choice_temperature=(2.0, 0.0),
  top_k=None,
  guidance_scale=9.0,
  guidance_schedule="constant",
)
# AmusedInpaintPipeline re-registers its scheduler with masking_schedule="linear".
AMUSED_INPAINT_SAMPLER = dataclasses.replace(AMUSED_SAMPLER, schedule="linear")

DEFAULT_AESTHETIC_SCORE = 6.0
DEFAULT_CROP = (0.0, 0.0)  # (top, left)
CLIP_LENGTH = 77  # tokens per prompt of aMUSEd's CLIP tokenizer

FORMAT = "muse_jax.amused/1"  # marks the transformer config a conversion writes


def guidance_from_diffusers(guidance_scale: float) -> float | None:
  """Our guidance t for diffusers' ``guidance_scale`` g: ``g − 1``, None (off) for g <= 1."""
  return float(guidance_scale) - 1.0 if guidance_scale > 1.0 else None


def micro_conditioning(
  width: int,
  height: int,
  *,
  crop: tuple[float, float] = DEFAULT_CROP,
  aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
) -> tuple[float, ...]:
  """aMUSEd's 5 micro-conditions, in the order its pipelines build them.

  Args:
    width, height: the "original size" in pixels (aMUSEd: the output size).
    crop: ``micro_conditioning_crop_coord``, (top, left) in pixels.
    aesthetic_score: the LAION aesthetic score to aim for.
  """
  return (float(width), float(height), float(crop[0]), float(crop[1]), float(aesthetic_score))


@dataclasses.dataclass(frozen=True)
class AmusedStage:
  """aMUSEd's U-ViT seen by the pipeline as ``ids [B, L] + text -> logits [B, L, K]``.

  Frozen and hashable (no arrays): a jit-compiled decode takes it as a static argument.
  """

  model: UVit2D
  grid: tuple[int, int]  # (h, w) of the token grid: 16x16 for amused-256, 32x32 for 512.
  mask_id: int = 8255  # the scheduler's mask_token_id (the U-ViT's last input id).
  micro_conds: tuple[float, ...] = micro_conditioning(256, 256)  # see micro_conditioning.
  text_length: int = CLIP_LENGTH  # T, for shape evaluation only (any T works).

  def __post_init__(self):
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
    object.__setattr__(self, "micro_conds", tuple(float(c) for c in self.micro_conds))
    if len(self.grid) != 2 or min(self.grid) < 1:
      raise ValueError(f"grid must be (h, w) token counts; got {self.grid}")
    if self.model.downsample and (self.grid[0] % 2 or self.grid[1] % 2):
      raise ValueError(f"a downsampling U-ViT needs an even token grid; got {self.grid}")
    if not self.model.codebook_size <= self.mask_id < self.model.vocab_size:
      raise ValueError(
        f"mask_id {self.mask_id} must be an input id outside the codebook: in "
        f"[{self.model.codebook_size}, {self.model.vocab_size})"
      )
    if len(self.micro_conds) != self.model.num_micro_conds:
      raise ValueError(
        f"micro_conds has {len(self.micro_conds)} values; the model takes "
        f"{self.model.num_micro_conds} (orig width, orig height, crop top, crop left, aesthetic score)"
      )

  @property
  def codebook_size(self) -> int:
    return self.model.codebook_size

  @property
  def needs_low_res(self) -> bool:
    return False

  @property
  def dtype(self) -> Any:
    return self.model.dtype

  def with_micro_conditioning(
    self,
    *,
    original_size: tuple[int, int] | None = None,
    crop: tuple[float, float] = DEFAULT_CROP,
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
  ) -> AmusedStage:
    """A copy with other micro-conditions; ``original_size`` (width, height) keeps the
    current one by default."""
    width, height = original_size or self.micro_conds[:2]
    conds = micro_conditioning(width, height, crop=crop, aesthetic_score=aesthetic_score)
    return dataclasses.replace(self, micro_conds=conds)

  def with_dtype(self, dtype: Any) -> AmusedStage:
    """A copy computing in ``dtype``: ``bfloat16`` multiplies in bfloat16 and sums in
    float32 (the logits stay float32), ~1.8x faster on AVX512-BF16 CPUs at full size.
    The attention follows (``uvit.fast_attention``: cuDNN's on recent NVIDIA GPUs in half
    precision).
    The params work unchanged; ``uvit.cast_kernels(params, dtype)`` spares every call
    its casts, as ``load_amused_stage`` does. The reverse is lossy: a stage loaded to
    compute in bfloat16 holds bfloat16 kernels, so for float32 weights load it again
    with ``dtype="float32"``."""
    dtype = jnp.dtype(dtype)
    model = self.model.clone(dtype=dtype, attention_implementation=fast_attention(dtype))
    return dataclasses.replace(self, model=model)

  def logits(
    self,
    params: Any,
    ids: jax.Array,
    text: TextEmbeddings,
    low_res_ids: jax.Array | None = None,
  ) -> jax.Array:
    """ids int32 [B, L] -> float32 logits [B, L, K] (L = h·w, row-major)."""
    del low_res_ids  # aMUSEd is a single stage.
    if text.pooled is None:
      raise ValueError(
        "aMUSEd's U-ViT needs the pooled text embedding (a CLIP text encoder); "
        "this text encoder gives none"
      )
    b, (h, w) = ids.shape[0], self.grid
    micro = jnp.broadcast_to(jnp.asarray(self.micro_conds, jnp.float32), (b, len(self.micro_conds)))
    logits = self.model.apply(
      {"params": params}, ids.reshape(b, h, w), text.embeddings, text.pooled, micro
    )  # [B, h, w, K]
    return logits.reshape(b, h * w, -1)

  def abstract_params(self) -> Any:
    """Boxed shape tree of the params (logical axis names kept)."""
    h, w = self.grid
    args = (
      jax.ShapeDtypeStruct((1, h, w), jnp.int32),
      jax.ShapeDtypeStruct((1, self.text_length, self.model.encoder_hidden_size), jnp.float32),
      jax.ShapeDtypeStruct((1, self.model.cond_embed_dim), jnp.float32),
      jax.ShapeDtypeStruct((1, self.model.num_micro_conds), jnp.float32),
    )
    return jax.eval_shape(lambda *a: self.model.init(jax.random.key(0), *a)["params"], *args)


# ---------------------------------------------------------------------------
# Inpainting masks as AmusedInpaintPipeline makes them.


def amused_inpaint_mask(mask: np.ndarray, factor: int) -> np.ndarray:
  """A pixel mask snapped to whole tokens the way ``AmusedInpaintPipeline`` masks tokens.

  diffusers resizes the mask image to the token grid (Lanczos for PIL images) and
  masks a token when the result is >= 0.5: roughly, when at least half of its
  ``factor x factor`` patch is masked. This uses the patch mean (the box filter;
  Lanczos differs only for patches near half covered). ``MusePipeline.inpaint``
  masks every token its mask touches at all, so that no marked pixel is kept from
  the original; passing it this function's output gives aMUSEd's token choice
  exactly, since a mask of whole tokens is its own token mask.

  Args:
    mask: [S, S] bool, 0/1 or 0..255 (uint8), True / high where to regenerate.
    factor: pixels per token side (the VQ's downsampling factor, 16 in aMUSEd).

  Returns:
    bool [S, S], constant on each token's patch.
  """
  m = np.asarray(mask)
  if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
    m = m[..., 0]
  if m.ndim != 2 or m.shape[0] % factor or m.shape[1] % factor:
    raise ValueError(
      f"mask must be [H, W] with sides a multiple of the token size {factor}; got {m.shape}"
    )
  scale = 255.0 if m.dtype == np.uint8 and m.max() > 1 else 1.0
  h, w = m.shape[0] // factor, m.shape[1] // factor
  coverage = (m.astype(np.float32) / scale).reshape(h, factor, w, factor).mean(axis=(1, 3))
  return np.kron(coverage >= 0.5, np.ones((factor, factor), bool)).astype(bool)


# ---------------------------------------------------------------------------
# Loading.


def stage_config_from_diffusers(root: PathLike) -> dict[str, Any]:
  """The stage description of a diffusers aMUSEd folder, from its configs only.

  Reads ``transformer/config.json``, ``scheduler/scheduler_config.json`` (mask id,
  masking schedule) and ``vqvae/config.json`` (the downsampling factor, which makes
  the default micro-conditioning's original size the output size).

  Returns:
    ``{"uvit": UVit2D kwargs, "grid", "mask_id", "micro_conds", "schedule"}``.

  Raises:
    FileNotFoundError / ValueError: naming the file and what is wrong.
  """
  root = pathlib.Path(root)
  cfg_path = root / "transformer" / "config.json"
  uvit = uvit_kwargs_from_config(read_json(cfg_path), str(cfg_path))
  sched_path = root / "scheduler" / "scheduler_config.json"
  sched = read_json(sched_path)
  if "mask_token_id" not in sched:
    raise ValueError(f"{sched_path} has no mask_token_id")
  vq_path = root / "vqvae" / "config.json"
  vq = read_json(vq_path)
  factor = 2 ** (len(vq.get("block_out_channels", (64,))) - 1)  # diffusers' vae_scale_factor
  side = int(uvit.get("sample_size", UVit2D.sample_size))
  size = side * factor
  return {
    "uvit": uvit,
    "grid": [side, side],
    "mask_id": int(sched["mask_token_id"]),
    "micro_conds": list(micro_conditioning(size, size)),
    "schedule": sched.get("masking_schedule", "cosine"),
  }


def _stage_from_config(
  config: dict[str, Any], device: jax.Device, param_dtype: Any = None, dtype: Any = None
) -> AmusedStage:
  dtype = jnp.dtype(dtype or config.get("dtype", "float32"))
  model = UVit2D(
    **config["uvit"],
    # Unrolled: what depends on the text alone (each layer's cross-attention keys and
    # values, its AdaLN modulations) then lies outside any inner loop, and XLA hoists
    # it out of the decode loop; inside nn.scan's loop it is recomputed every step. On
    # 2 CPU cores, 12 guided amused-256 calls in bfloat16 take 13.9 against 15.4 s
    # (compiling in 7 against 4 s). Checkpoints stay stacked.
    scan_layers=False,
    dtype=dtype,
    param_dtype=jnp.dtype(param_dtype or config.get("param_dtype", "float32")),
    attention_implementation=fast_attention(dtype, device),
  )
  return AmusedStage(
    model,
    grid=tuple(config["grid"]),
    mask_id=int(config["mask_id"]),
    micro_conds=tuple(config["micro_conds"]),
  )


def load_amused_stage(
  path: PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules: partitioning.Rules = partitioning.DEFAULT_RULES,
  dtype: Any = None,
) -> tuple[AmusedStage, Any]:
  """Loads aMUSEd's U-ViT as a pipeline stage, parameters placed by the logical rules.

  Args:
    path: a converted run's ``transformer/`` folder (``muse-jax convert amused``:
      config.json + an orbax checkpoint), or a diffusers aMUSEd folder / its
      ``transformer/`` (converted on the fly, with the sibling ``scheduler/`` and
      ``vqvae/`` configs).
    mesh: devices to place the parameters on (default: all, on ``data``).
    rules: logical-to-mesh rules.
    dtype: computation dtype; default: the converted config's ``dtype`` (float32
      unless converted with ``--dtype bfloat16``; see ``AmusedStage.with_dtype``).

  Returns:
    ``(stage, params)``; with a compute dtype narrower than the stored one, the kernels
    come already cast to it (``uvit.cast_kernels``).
  """
  path = pathlib.Path(path)
  mesh = mesh or partitioning.make_mesh()
  device = mesh.devices.flat[0]
  cfg_file = path / checkpointing.CONFIG_FILE
  config = read_json(cfg_file) if cfg_file.is_file() else {}
  if config.get("format") != FORMAT:
    root = path.parent if cfg_file.is_file() else path
    if not (root / "transformer" / "config.json").is_file():
      raise FileNotFoundError(
        f"{path}: neither a converted aMUSEd transformer (config.json with format {FORMAT!r}) "
        "nor a diffusers aMUSEd folder (transformer/, scheduler/, vqvae/)"
      )
    config = stage_config_from_diffusers(root)
    stage = _stage_from_config(config, device, np.float32, dtype)
    shardings = partitioning.logical_shardings(stage.abstract_params(), mesh, rules)
    _, params = load_uvit(root / "transformer", scan_layers=False, shardings=shardings)
    return stage, cast_kernels(params, stage.model.dtype)
  stage = _stage_from_config(config, device, dtype=dtype)
  # The converter writes the layers stacked (load_uvit's default layout).
  stacked = dataclasses.replace(stage, model=stage.model.clone(scan_layers=True))
  abstract = partitioning.sharded_abstract(stacked.abstract_params(), mesh, rules)
  with checkpointing.Checkpointer(path, async_save=False) as ckpt:
    restored = ckpt.restore_or_none({"params": abstract})
  if restored is None:
    raise FileNotFoundError(f"{path} holds no checkpoint (convert the aMUSEd folder again)")
  shardings = partitioning.logical_shardings(stage.abstract_params(), mesh, rules)
  # Kernels cast to the compute dtype here, once, rather than in every decode call.
  unstack = lambda p: cast_kernels(unstack_layers(p), stage.model.dtype)
  return stage, jax.jit(unstack, out_shardings=shardings)(restored.state["params"])
