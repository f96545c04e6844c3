"""Prompt tokenization for the frozen text encoders, matching transformers token for token.

Three ways a Hugging Face folder ships its tokenizer, tried in this order:

* ``tokenizer.json``: run by the `tokenizers` library (what transformers 5 runs);
* ``vocab.json`` + ``merges.txt`` (CLIP; diffusers pipeline folders): the byte-level BPE
  tokenizer is assembled exactly as transformers' CLIPTokenizer assembles it (NFC,
  whitespace collapsed, lower case, CLIP's split regex, ``</w>`` word ends,
  ``<|startoftext|> ... <|endoftext|>``);
* ``spiece.model`` (T5): run by `sentencepiece`, with ``</s>`` appended.

Every prompt becomes exactly ``max_length`` ids: special tokens added, too-long prompts
truncated (keeping the closing special token) and the rest padded with the pad token,
plus a mask of the real tokens, as transformers' ``padding="max_length",
truncation=True`` gives. Fixed shapes let one compiled encoder serve every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import pathlib

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

from muse_jax.convert.io import PathLike

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json + merges.txt")
# tokenizer_config.json writes 1e30 ("no limit") when a tokenizer has no maximum.
_NO_LIMIT = 10**9
_CLIP_SPLIT = (
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
  """Fixed-length token ids for a batch of prompts."""

  ids: np.ndarray  # int32 [B, T]
  mask: np.ndarray  # bool [B, T], True at real tokens (specials included).
  dropped: np.ndarray  # int32 [B], tokens cut off by truncation.


def has_tokenizer(folder: pathlib.Path) -> bool:
  return (
    (folder / "tokenizer.json").is_file()
    or (folder / "spiece.model").is_file()
    or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
  )


def _token_name(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_json_if_present(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def clip_bpe_tokenizer(
  vocab_file: PathLike, merges_file: PathLike, bos: str, eos: str, unk: str
) -> tokenizers.Tokenizer:
  """CLIP's byte-level BPE tokenizer from vocab.json + merges.txt, as transformers builds it."""
  bpe = tokenizers.models.BPE.from_file(
    str(vocab_file),
    str(merges_file),
    continuing_subword_prefix="",
    end_of_word_suffix="</w>",
    unk_token=unk,
  )
  tok = tokenizers.Tokenizer(bpe)
  tok.normalizer = normalizers.Sequence(
    [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
  )
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([bos, eos] + ([unk] if unk not in (bos, eos) else []))
  tok.post_processor = processors.RobertaProcessing(
    (eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)), False, False
  )
  return tok


class Tokenizer:
  """Pads and truncates prompts to fixed-length ids; see the module docstring."""

  def __init__(
    self,
    encode: Callable[[list[str]], list[list[int]]],
    truncate: Callable[[list[str], int], list[list[int]]],
    pad_id: int,
    model_max_length: int | None,
    source: str,
  ):
    """Prefer ``Tokenizer.from_folder``.

    Args:
      encode: prompts -> ids with special tokens, untruncated.
      truncate: (prompts, max_length) -> ids truncated to max_length, specials kept.
      pad_id: id written after the last real token.
      model_max_length: the folder's stated maximum length, if any.
      source: the file it was read from, for messages.
    """
    self._encode, self._truncate = encode, truncate
    self.pad_id, self.model_max_length, self.source = pad_id, model_max_length, source

  @classmethod
  def from_folder(cls, folder: PathLike, family: str) -> Tokenizer:
    """Loads the tokenizer of a Hugging Face folder.

    Args:
      folder: holds tokenizer.json, spiece.model or vocab.json + merges.txt, and
        optionally tokenizer_config.json / special_tokens_map.json.
      family: "t5" or "clip", for the special-token defaults.

    Raises:
      FileNotFoundError: naming the folder and the files looked for.
      ValueError: the pad token is not in the vocabulary.
    """
    folder = pathlib.Path(folder)
    config = {
      **_read_json_if_present(folder / "special_tokens_map.json"),
      **_read_json_if_present(folder / "tokenizer_config.json"),
    }
    special = {k: _token_name(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
    limit = config.get("model_max_length")
    model_max_length = (
      int(limit) if isinstance(limit, (int, float)) and 0 < limit < _NO_LIMIT else None
    )

    if (folder / "tokenizer.json").is_file():
      tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
      source = folder / "tokenizer.json"
    elif (
      family == "clip" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
      tok = clip_bpe_tokenizer(
        folder / "vocab.json",
        folder / "merges.txt",
        bos=special["bos"] or "<|startoftext|>",
        eos=special["eos"] or "<|endoftext|>",
        unk=special["unk"] or "<|endoftext|>",
      )
      source = folder / "vocab.json"
    elif family == "t5" and (folder / "spiece.model").is_file():
      return cls._from_sentencepiece(folder / "spiece.model", special, model_max_length)
    else:
      raise FileNotFoundError(
        f"{folder}: no {family} tokenizer found; expected one of {TOKENIZER_FILES}"
      )

    tok.no_padding()
    tok.no_truncation()
    pad = special["pad"] or ("<|endoftext|>" if family == "clip" else "<pad>")
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
      raise ValueError(f"{source}: pad token {pad!r} is not in the vocabulary")

    def encode(prompts: list[str]) -> list[list[int]]:
      return [e.ids for e in tok.encode_batch(prompts)]

    def truncate(prompts: list[str], max_length: int) -> list[list[int]]:
      tok.enable_truncation(max_length)
      try:
        return encode(prompts)
      finally:
        tok.no_truncation()

    return cls(encode, truncate, pad_id, model_max_length, str(source))

  @classmethod
  def _from_sentencepiece(
    cls, path: pathlib.Path, special: dict, model_max_length: int | None
  ) -> Tokenizer:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    eos = sp.piece_to_id(special["eos"]) if special["eos"] else sp.eos_id()
    pad = sp.piece_to_id(special["pad"]) if special["pad"] else sp.pad_id()
    if eos < 0 or pad < 0:
      raise ValueError(
        f"{path}: the model defines no end-of-sequence or pad piece (eos id {eos}, pad id {pad})"
      )

    def encode(prompts: list[str]) -> list[list[int]]:
      return [ids + [eos] for ids in sp.encode(prompts)]

    def truncate(prompts: list[str], max_length: int) -> list[list[int]]:
      return [ids[: max_length - 1] + [eos] for ids in sp.encode(prompts)]

    return cls(encode, truncate, pad, model_max_length, str(path))

  def __call__(self, prompts: Sequence[str], max_length: int) -> TokenizedBatch:
    """Tokenizes, truncates to and pads to ``max_length``.

    Args:
      prompts: any strings, empty ones included.
      max_length: T, the length of every row (at least 2: room for the specials).

    Returns:
      ``TokenizedBatch`` with ids [B, T], mask [B, T] and the per-prompt count of
      dropped tokens.
    """
    if isinstance(prompts, str):
      raise TypeError(f"prompts must be a sequence of strings, not one string: {prompts!r}")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
      raise TypeError(f"prompts must be strings; got {sorted(set(bad))}")
    if max_length < 2:
      raise ValueError(
        f"max_length={max_length}; expected at least 2 (room for the special tokens)"
      )
    prompts = list(prompts)
    rows = self._encode(prompts)
    long = [i for i, r in enumerate(rows) if len(r) > max_length]
    dropped = np.zeros(len(rows), np.int32)
    if long:
      for i, ids in zip(long, self._truncate([prompts[i] for i in long], max_length)):
        dropped[i] = len(rows[i]) - len(ids)
        rows[i] = ids
    ids = np.full((len(rows), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), bool)
    for i, row in enumerate(rows):
      ids[i, : len(row)] = row
      mask[i, : len(row)] = True
    return TokenizedBatch(ids, mask, dropped)
