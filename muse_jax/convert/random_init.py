"""Random-weight Hugging Face text-encoder folders (T5, CLIP), in the layout transformers writes.

For the demo and the benchmarks, which need a real folder (config.json, safetensors,
tokenizer) without downloading one: `TextEncoder.from_pretrained` then reads it exactly as
it reads a published checkpoint. Weights are written group by group (embeddings, each
block, the final norm), one safetensors shard per group with a `model.safetensors.index.json`,
so the writer never holds a large model in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
import tokenizers
from tokenizers import models, pre_tokenizers, processors


def t5_layers(c: dict) -> list[dict[str, tuple[int, ...]]]:
  """HF tensor names and shapes, grouped per shard: embeddings, each block, final norm."""
  d, inner, f = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
  groups = [{"shared.weight": (c["vocab_size"], d)}]
  for i in range(c["num_layers"]):
    p = f"encoder.block.{i}.layer"
    block = {f"{p}.0.SelfAttention.{w}.weight": (inner, d) for w in "qkv"}
    block[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
    block[f"{p}.0.layer_norm.weight"] = (d,)
    if i == 0:
      block[f"{p}.0.SelfAttention.relative_attention_bias.weight"] = (
        c["relative_attention_num_buckets"],
        c["num_heads"],
      )
    block.update({f"{p}.1.DenseReluDense.{w}.weight": (f, d) for w in ("wi_0", "wi_1")})
    block[f"{p}.1.DenseReluDense.wo.weight"] = (d, f)
    block[f"{p}.1.layer_norm.weight"] = (d,)
    groups.append(block)
  groups.append({"encoder.final_layer_norm.weight": (d,)})
  return groups


def clip_layers(c: dict) -> list[dict[str, tuple[int, ...]]]:
  d, f = c["hidden_size"], c["intermediate_size"]
  t = "text_model."
  groups = [
    {
      f"{t}embeddings.token_embedding.weight": (c["vocab_size"], d),
      f"{t}embeddings.position_embedding.weight": (c["max_position_embeddings"], d),
    }
  ]
  for i in range(c["num_hidden_layers"]):
    p = f"{t}encoder.layers.{i}"
    layer = {}
    for w in ("q", "k", "v", "out"):
      layer[f"{p}.self_attn.{w}_proj.weight"] = (d, d)
      layer[f"{p}.self_attn.{w}_proj.bias"] = (d,)
    for n in ("layer_norm1", "layer_norm2"):
      layer[f"{p}.{n}.weight"] = (d,)
      layer[f"{p}.{n}.bias"] = (d,)
    layer.update(
      {f"{p}.mlp.fc1.weight": (f, d), f"{p}.mlp.fc1.bias": (f,), f"{p}.mlp.fc2.weight": (d, f)}
    )
    layer[f"{p}.mlp.fc2.bias"] = (d,)
    groups.append(layer)
  groups.append(
    {
      f"{t}final_layer_norm.weight": (d,),
      f"{t}final_layer_norm.bias": (d,),
      "text_projection.weight": (c["projection_dim"], d),
    }
  )
  return groups


def write_random_folder(
  folder: pathlib.Path,
  hf_config: dict,
  dtype: str = "float32",
  seed: int = 0,
  tokenizer_from: pathlib.Path | None = None,
) -> int:
  """Writes config.json, sharded safetensors (one shard per group) and, if given, the
  tokenizer files of ``tokenizer_from``.

  Returns:
    The number of parameters written.
  """
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(hf_config, indent=1))
  groups = t5_layers(hf_config) if hf_config["model_type"] == "t5" else clip_layers(hf_config)
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  rng = np.random.default_rng(seed)
  weight_map, total = {}, 0
  for i, group in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    tensors = {}
    for name, shape in group.items():
      if len(shape) == 1:  # norm scales near 1, biases near 0.
        value = (1.0 if "norm" in name and "weight" in name else 0.0) + 0.02 * rng.standard_normal(
          shape, np.float32
        )
      else:  # fan-in scaled, so activations stay finite through the stack.
        value = rng.standard_normal(shape, np.float32) / np.sqrt(
          shape[-1] if "embedding" not in name else 1.0
        )
        if "shared" in name or "embedding" in name:
          value *= 0.5
      tensors[name] = value.astype(np_dtype)
      total += value.size
    save_file(tensors, str(folder / file))
    weight_map.update(dict.fromkeys(group, file))
  index = {
    "metadata": {"total_size": total * np.dtype(np_dtype).itemsize},
    "weight_map": weight_map,
  }
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
  for name in (
    "spiece.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
  ):
    if tokenizer_from is not None and (tokenizer_from / name).is_file():
      shutil.copy(tokenizer_from / name, folder / name)
  return total


def write_word_tokenizer(folder: pathlib.Path, words: Sequence[str]) -> int:
  """Writes a T5-style word-level tokenizer.json for a closed vocabulary.

  Ids: 0 <pad>, 1 </s> (appended to every prompt), 2 <unk>, then ``words`` in order.
  Returns the vocabulary size.
  """
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for word in words:
    vocab.setdefault(word, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  config = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 64}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
  return len(vocab)
