"""Muse-3B base transformer (paper §2.3, Table 6): 48 layers, width 2048, MLP 8192.

32 heads of 64 (the paper does not give the head count). Trained on TPU v4-512 with
batch 512 for ~1M steps. The default FSDP sharding (parameters and optimizer state over
all chips), bf16 compute and "dots_no_batch" remat need 6.75 GiB per chip on v4 with 64
chips, 2.2 GiB with 256 and 1.4 GiB with 512, of 32 GiB (benchmarks/aot_tpu.py).

  muse-jax train --config configs/muse_base_3b.py --workdir gs://BUCKET/muse_3b \\
      --config.data.source=pre_encoded --config.data.path=gs://BUCKET/shards
  muse-jax train --config configs/muse_base_3b.py:tiny --workdir /tmp/muse_tiny   # CPU
"""

import ml_collections

from muse_jax.trainers.transformer import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(
    width=2048, num_layers=48, num_heads=32, mlp_dim=8192, remat_policy="dots_no_batch"
  )
  if arg == "tiny":
    c.model.update(
      vocab_size=64, grid=(8, 8), width=32, num_layers=3, num_heads=4, mlp_dim=128, dtype="float32"
    )
    c.text.update(length=8, dim=16)
    c.data.update(source="synthetic", num_classes=8)
    c.train.update(steps=200, batch_size=16, log_every=20, ckpt_every=100, keep=2, keep_every=0)
    c.optim.update(lr=3e-3, warmup_steps=20)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'tiny'")
  return c
