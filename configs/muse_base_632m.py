"""Muse base transformer, 632M parameters (paper §2.3, Table 4; CC3M / Imagen-data runs).

24 pre-LN blocks of width 1280 (MLP 5120, 20 heads of 64) over 16x16 tokens of the f16
VQGAN (K = 8192), cross-attending to projected T5-XXL embeddings (128 x 4096).
Adafactor (β1 0.9, β2 0.96, wd 0.045), lr 1e-4, 5k warmup, cosine; batch 512.

  muse-jax train --config configs/muse_base_632m.py --workdir gs://BUCKET/muse_632m \\
      --config.data.source=pre_encoded --config.data.path=gs://BUCKET/shards
  muse-jax train --config configs/muse_base_632m.py:tiny --workdir /tmp/muse_tiny   # CPU
"""

import ml_collections

from muse_jax.trainers.transformer import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(width=1280, num_layers=24, num_heads=20, mlp_dim=5120)
  if arg == "tiny":  # A few-second CPU run on the synthetic token task (the tests use it).
    c.model.update(
      vocab_size=64, grid=(8, 8), width=32, num_layers=2, num_heads=4, mlp_dim=64, dtype="float32"
    )
    c.text.update(length=8, dim=16)
    c.data.update(source="synthetic", num_classes=8)
    c.train.update(steps=200, batch_size=16, log_every=20, ckpt_every=100, keep=2, keep_every=0)
    c.optim.update(lr=3e-3, warmup_steps=20)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'tiny'")
  return c
