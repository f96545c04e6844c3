"""Frozen text encoders: which folder, how many tokens, which dtype, and the known sizes.

The encoder is named by the path of a Hugging Face folder (weights are never
downloaded here); `hf_config` holds the architecture as that folder's config.json
spells it, so sizes are known without the weights (random models for benchmarks,
ahead-of-time memory checks, the width of the image transformers' text projection).

Variants (`--config=configs/text_encoders.py:VARIANT`):
  t5_v1_1_{small,base,large,xl,xxl}, flan_t5_{...} (same sizes), t5_{small,base,large,3b,11b}
  (original, ReLU), clip_b32, clip_l14 (aMUSEd), clip_h14, clip_bigg14, and `tiny_t5` /
  `tiny_clip` (the test fixtures, for CPU runs).

Pre-encoding captions with Muse's encoder:
  muse-jax encode-text --text-encoder=/models/t5-v1_1-xxl --captions=captions.txt --out=/data/text
Other configs embed this one (`config.text = text_encoders.get_config("t5_v1_1_xxl")`) and
every knob is overridable: `--config.text.path=/models/amused-256 --config.text.max_length=77`.
"""

import pathlib

import ml_collections

_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "text"

# T5 encoders: (d_model, d_kv, d_ff, num_layers, num_heads). Vocabulary 32128 throughout.
_T5_V1_1 = {
  "small": (512, 64, 1024, 8, 6),
  "base": (768, 64, 2048, 12, 12),
  "large": (1024, 64, 2816, 24, 16),
  "xl": (2048, 64, 5120, 24, 32),
  "xxl": (4096, 64, 10240, 24, 64),  # Muse's encoder: 4.76B parameters.
}
_T5_ORIGINAL = {
  "small": (512, 64, 2048, 6, 8),
  "base": (768, 64, 3072, 12, 12),
  "large": (1024, 64, 4096, 24, 16),
  "3b": (1024, 128, 16384, 24, 32),
  "11b": (1024, 128, 65536, 24, 128),
}
# CLIP text towers: (hidden_size, intermediate_size, num_layers, num_heads, projection_dim, act).
_CLIP = {
  "clip_b32": (512, 2048, 12, 8, 512, "quick_gelu"),
  "clip_l14": (768, 3072, 12, 12, 768, "quick_gelu"),  # aMUSEd's encoder.
  "clip_h14": (1024, 4096, 24, 16, 1024, "gelu"),
  "clip_bigg14": (1280, 5120, 32, 20, 1280, "gelu"),
}


def _t5(sizes: tuple, gated: bool) -> dict:
  d_model, d_kv, d_ff, layers, heads = sizes
  return dict(
    model_type="t5",
    architectures=["T5EncoderModel"],
    vocab_size=32128,
    d_model=d_model,
    d_kv=d_kv,
    d_ff=d_ff,
    num_layers=layers,
    num_heads=heads,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu" if gated else "relu",
  )


def _clip(sizes: tuple) -> dict:
  hidden, mlp, layers, heads, projection, act = sizes
  return dict(
    model_type="clip_text_model",
    architectures=["CLIPTextModelWithProjection"],
    vocab_size=49408,
    hidden_size=hidden,
    intermediate_size=mlp,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    max_position_embeddings=77,
    projection_dim=projection,
    hidden_act=act,
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the text-encoder config for variant ``arg`` (default ``t5_v1_1_xxl``)."""
  name = arg or "t5_v1_1_xxl"
  config = ml_collections.ConfigDict()
  config.name = name
  config.path = ""  # the Hugging Face folder; must be set for real runs.
  config.dtype = "bfloat16"  # compute and parameter dtype: bfloat16 or float32.
  config.batch_size = 64  # prompts per encoder call when pre-encoding.
  if name.startswith(("t5_v1_1_", "flan_t5_")) and name.rsplit("_", 1)[1] in _T5_V1_1:
    hf = _t5(_T5_V1_1[name.rsplit("_", 1)[1]], gated=True)
  elif name.startswith("t5_") and name[3:] in _T5_ORIGINAL:
    hf = _t5(_T5_ORIGINAL[name[3:]], gated=False)
  elif name in _CLIP:
    hf = _clip(_CLIP[name])
  elif name == "tiny_t5":
    config.path = str(_FIXTURES / "t5_v1_1")
    hf = dict(_t5((32, 8, 48, 3, 4), gated=True), vocab_size=265)
  elif name == "tiny_clip":
    config.path = str(_FIXTURES / "clip")
    hf = dict(
      _clip((32, 64, 3, 4, 24, "quick_gelu")), vocab_size=2014, bos_token_id=2012, eos_token_id=2
    )
  else:
    variants = [f"t5_v1_1_{s}" for s in _T5_V1_1] + [f"flan_t5_{s}" for s in _T5_V1_1]
    variants += [f"t5_{s}" for s in _T5_ORIGINAL] + list(_CLIP) + ["tiny_t5", "tiny_clip"]
    raise ValueError(
      f"configs/text_encoders.py: unknown variant {arg!r}; expected one of {variants}"
    )
  config.family = "t5" if hf["model_type"] == "t5" else "clip"
  if config.family == "t5":
    # Muse does not state its text length; 128 T5 tokens hold long captions whole.
    config.max_length = 32 if name == "tiny_t5" else 128
    config.hidden_layer = "final"  # T5: the final-norm last hidden state.
    config.embed_dim = hf["d_model"]
    config.pooled_dim = 0  # none.
  else:
    config.max_length = 77
    config.hidden_layer = -2  # aMUSEd: the penultimate layer, before the final norm.
    config.embed_dim = hf["hidden_size"]
    config.pooled_dim = hf["projection_dim"]
  if name == "tiny_t5" or name == "tiny_clip":
    config.dtype = "float32"
    config.batch_size = 4
  config.hf_config = ml_collections.ConfigDict(hf)
  return config
