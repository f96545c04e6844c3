"""Frozen text encoders: prompts -> token embeddings + mask (+ pooled), for conditioning.

Muse (paper §2.1) conditions every transformer on a frozen T5-XXL encoder's output
sequence; aMUSEd uses CLIP-L/14: the penultimate hidden states for cross-attention and
the pooled text projection for AdaLN. ``TextEncoder`` owns a Hugging Face folder's
tokenizer and parameters and runs one jit-compiled function:

    encoder = TextEncoder.from_pretrained("/path/t5-v1_1-xxl", dtype=jnp.bfloat16, mesh=mesh)
    cond = encoder.encode(["a red cube on a blue sphere"])  # TextEmbeddings
    uncond = encoder.unconditional(1)  # the empty prompt: classifier-free guidance's negative

Prompts are padded to a fixed ``max_length`` and batches to power-of-two buckets (and a
multiple of the mesh's batch shards), so the function compiles once per bucket. For T5
the embeddings are the final-norm last hidden state and ``mask`` is the attention mask
the encoder used. CLIP is causal and run without a padding mask, as diffusers' aMUSEd
pipeline runs it, so its states after the end-of-text token are well defined and aMUSEd
attends to all T of them; ``mask`` still marks the real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
import pathlib
from typing import Any, Literal

from absl import logging
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.convert.hf_text import TextCheckpoint, load_params, open_text_checkpoint
from muse_jax.convert.io import PathLike
from muse_jax.partitioning import DATA, DEFAULT_RULES, FSDP, Rules, shard_batch
from muse_jax.tokenizer import TOKENIZER_FILES, TokenizedBatch, Tokenizer, has_tokenizer

HiddenLayer = int | Literal["final"] | None
# T5 has relative positions and no length limit of its own; its tokenizers state 512.
DEFAULT_T5_MAX_LENGTH = 512


@flax.struct.dataclass
class TextEmbeddings:
  """What a text encoder gives the image transformers."""

  embeddings: jax.Array  # float [B, T, D]
  mask: jax.Array  # bool [B, T], True at real tokens.
  pooled: jax.Array | None = None  # float [B, P]; CLIP only.

  @property
  def batch_size(self) -> int:
    return self.embeddings.shape[0]


def concatenate(parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
  """Stacks embeddings along the batch, e.g. ``[cond, uncond]`` for guidance."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def resolve_folders(
  folder: PathLike, tokenizer_folder: PathLike | None = None
) -> tuple[pathlib.Path, pathlib.Path]:
  """Finds the model and tokenizer folders.

  Accepts a transformers folder (tokenizer inside), a diffusers pipeline's
  ``text_encoder/`` folder (tokenizer in the sibling ``tokenizer/``), or the pipeline
  root (``model_index.json`` beside ``text_encoder/`` and ``tokenizer/``).
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"text encoder folder {folder} does not exist")
  if (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
    folder = folder / "text_encoder"
    if not folder.is_dir():
      raise FileNotFoundError(
        f"{folder.parent}: a pipeline folder without a text_encoder/ subfolder"
      )
  if tokenizer_folder is not None:
    return folder, pathlib.Path(tokenizer_folder)
  for candidate in (folder, folder.parent / "tokenizer"):
    if has_tokenizer(candidate):
      return folder, candidate
  raise FileNotFoundError(
    f"{folder}: no tokenizer found; expected one of {TOKENIZER_FILES} in it or in a sibling 'tokenizer' folder"
  )


def _next_bucket(n: int, multiple: int) -> int:
  size = max(1 << (n - 1).bit_length(), multiple)
  return -(-size // multiple) * multiple


class TextEncoder:
  """A tokenizer and a frozen T5 or CLIP text encoder with its (sharded) parameters."""

  def __init__(
    self,
    checkpoint: TextCheckpoint,
    params: Any,
    tokenizer: Tokenizer,
    *,
    max_length: int,
    hidden_layer: HiddenLayer = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
  ):
    """Prefer ``TextEncoder.from_pretrained``. Arguments as there."""
    self.checkpoint, self.params, self.tokenizer = checkpoint, params, tokenizer
    self.family, self.module = checkpoint.family, checkpoint.module
    self.max_length, self.mesh, self.rules = max_length, mesh, rules
    if self.family == "t5":
      if hidden_layer not in (None, "final"):
        raise ValueError(
          f"hidden_layer={hidden_layer!r}: T5 gives only its final-norm last hidden state ('final')"
        )
      hidden_layer = "final"
    elif hidden_layer is None:
      hidden_layer = -2  # aMUSEd's choice.
    elif hidden_layer != "final" and not (
      isinstance(hidden_layer, int)
      and -self.module.num_layers - 1 <= hidden_layer <= self.module.num_layers
    ):
      raise ValueError(
        f"hidden_layer={hidden_layer!r}; expected 'final' or an index into the "
        f"{self.module.num_layers + 1} hidden states ({-self.module.num_layers - 1}..{self.module.num_layers})"
      )
    self.hidden_layer = hidden_layer
    self._batch_shards = 1 if mesh is None else mesh.shape[DATA] * mesh.shape[FSDP]
    self._encode_ids = jax.jit(self.apply)
    self._unconditional: TextEmbeddings | None = None

  @classmethod
  def from_pretrained(
    cls,
    folder: PathLike,
    *,
    max_length: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    hidden_layer: HiddenLayer = None,
    tokenizer_folder: PathLike | None = None,
  ) -> TextEncoder:
    """Loads a Hugging Face T5 or CLIP text-encoder folder.

    Args:
      folder: a transformers folder (config.json, model.safetensors or a sharded index,
        tokenizer.json / spiece.model / vocab.json + merges.txt), a diffusers pipeline's
        ``text_encoder`` folder, or the pipeline root.
      max_length: T, tokens per prompt; default: the tokenizer's ``model_max_length``
        (capped by CLIP's positions), else CLIP's positions or 512 for T5.
      dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.
      param_dtype: storage dtype of the parameters; default ``dtype``. (bf16 storage
        with float32 compute halves the memory and keeps float32 arithmetic.)
      mesh: shard parameters and batches over it; None: the first device.
      rules: logical-to-mesh rules; default ``DEFAULT_RULES``.
      hidden_layer: CLIP: index into transformers' ``hidden_states`` (0 = embeddings,
        -1 = last layer before the final norm; default -2, aMUSEd's) or "final" for the
        final-norm last hidden state. T5: only "final" (the default).
      tokenizer_folder: where the tokenizer lives, if not found automatically.

    Raises:
      FileNotFoundError: a folder or a file is missing (named in the message).
      ValueError: unsupported architecture, or inconsistent config / weights / arguments.
    """
    rules = DEFAULT_RULES if rules is None else rules
    model_folder, tok_folder = resolve_folders(folder, tokenizer_folder)
    checkpoint = open_text_checkpoint(model_folder, dtype=dtype, param_dtype=param_dtype)
    tokenizer = Tokenizer.from_folder(tok_folder, checkpoint.family)
    positions = getattr(checkpoint.module, "max_length", None)  # CLIP's position table.
    if max_length is None:
      max_length = tokenizer.model_max_length or positions or DEFAULT_T5_MAX_LENGTH
      max_length = min(max_length, positions) if positions else max_length
    if positions and max_length > positions:
      raise ValueError(
        f"max_length={max_length} exceeds the {positions} positions of the CLIP model in {model_folder}"
      )
    params = load_params(checkpoint, mesh=mesh, rules=rules)
    return cls(
      checkpoint,
      params,
      tokenizer,
      max_length=max_length,
      hidden_layer=hidden_layer,
      mesh=mesh,
      rules=rules,
    )

  @property
  def embed_dim(self) -> int:
    """D of ``embeddings``."""
    return self.module.embed_dim

  @property
  def pooled_dim(self) -> int | None:
    """P of ``pooled`` (None for T5)."""
    if self.family == "t5":
      return None
    return self.module.projection_dim or self.module.embed_dim

  def apply(self, params: Any, ids: jax.Array, mask: jax.Array) -> TextEmbeddings:
    """The pure encoder function (jit it, or call it inside a jit-compiled step).

    Args:
      params: the parameter tree (``self.params``).
      ids: int32 [B, T] token ids from ``tokenize``.
      mask: bool [B, T] real-token mask from ``tokenize``.
    """
    if self.family == "t5":
      return TextEmbeddings(self.module.apply({"params": params}, ids, mask), mask)
    final = self.hidden_layer == "final"
    hidden, last, pooled = self.module.apply(
      {"params": params}, ids, hidden_layer=-1 if final else self.hidden_layer
    )
    return TextEmbeddings(last if final else hidden, mask, pooled)

  def tokenize(self, prompts: Sequence[str]) -> TokenizedBatch:
    """Token ids [B, T] and mask, truncation logged."""
    batch = self.tokenizer(prompts, self.max_length)
    cut = batch.dropped > 0
    if cut.any():
      logging.warning(
        "text encoder: truncated %d of %d prompts to %d tokens, dropping %d tokens (up to %d from one prompt)",
        int(cut.sum()),
        len(cut),
        self.max_length,
        int(batch.dropped.sum()),
        int(batch.dropped.max()),
      )
    return batch

  def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> TextEmbeddings:
    """Encodes already tokenized rows (padded to a bucket, run, and cut back)."""
    n = ids.shape[0]
    if n == 0:
      raise ValueError("encode needs at least one prompt; got an empty list")
    size = _next_bucket(n, self._batch_shards)
    if size != n:  # pad with copies of the first row: valid inputs, results dropped.
      ids = np.concatenate([ids, np.repeat(ids[:1], size - n, axis=0)])
      mask = np.concatenate([mask, np.repeat(mask[:1], size - n, axis=0)])
    if self.mesh is None:
      out = self._encode_ids(self.params, ids, mask)
    else:
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        out = self._encode_ids(self.params, *shard_batch((ids, mask), self.mesh))
    return out if size == n else jax.tree.map(lambda x: x[:n], out)

  def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
    """Embeds prompts (any strings, empty included).

    Returns:
      ``TextEmbeddings``: embeddings [B, T, D] in the encoder's dtype, mask [B, T],
      pooled [B, P] for CLIP (None for T5).
    """
    batch = self.tokenize(prompts)
    return self.encode_tokens(batch.ids, batch.mask)

  def unconditional(self, batch_size: int) -> TextEmbeddings:
    """The empty prompt's embeddings repeated ``batch_size`` times (guidance's negative)."""
    if self._unconditional is None:
      self._unconditional = self.encode([""])
    return jax.tree.map(
      lambda x: jnp.broadcast_to(x, (batch_size, *x.shape[1:])), self._unconditional
    )

  def __repr__(self) -> str:
    return (
      f"TextEncoder({self.checkpoint.folder}, family={self.family}, D={self.embed_dim}, "
      f"T={self.max_length}, dtype={jnp.dtype(self.module.dtype).name}, "
      f"param_dtype={jnp.dtype(self.module.param_dtype).name}, hidden_layer={self.hidden_layer})"
    )
