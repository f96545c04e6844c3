"""Muse super-resolution transformer, 256 -> 512 (paper §2.4, Table 6).

A 16-layer low-res encoder over the base model's 16x16 ids (f16 VQGAN) and a 32-layer
high-res masked transformer over the 64x64 ids of the f8 VQGAN (K = 8192), width 1024,
MLP 4096, 16 heads of 64. The high-res self-attention is multi-axis (8x8 blocks + an 8x8
grid, half the heads each); cross-attention reads the low-res encoding concatenated
with the projected T5-XXL text.

  muse-jax train --config configs/muse_superres_512.py --workdir gs://BUCKET/muse_sr \\
      --config.data.source=pre_encoded --config.data.path=gs://BUCKET/shards \\
      --config.data.ids_key=ids_512 --config.data.low_res_ids_key=ids_256
  muse-jax train --config configs/muse_superres_512.py:tiny --workdir /tmp/muse_sr_tiny
"""

import ml_collections

from muse_jax.trainers.transformer import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.model.update(
    kind="superres",
    grid=(64, 64),
    width=1024,
    num_layers=32,
    num_heads=16,
    mlp_dim=4096,
    attention="multi_axis",
    window=8,
    low_vocab_size=8192,
    low_grid=(16, 16),
    num_low_layers=16,
    # Full remat: at batch 512 on 64 v4 chips (8 examples of 4096 tokens per chip) the step
    # needs 7.3 GiB of 32; saving the projections ("dots_no_batch") needs 32.03 GiB there
    # and fits only on larger slices (512 chips: 3.8 GiB). See benchmarks/aot_tpu.py.
    remat_policy="full",
  )
  c.data.update(ids_key="ids_512", low_res_ids_key="ids_256")
  c.sample.update(steps=8)
  if arg == "tiny":
    c.model.update(
      vocab_size=64,
      grid=(8, 8),
      width=32,
      num_layers=2,
      num_heads=4,
      mlp_dim=64,
      window=4,
      low_vocab_size=32,
      low_grid=(4, 4),
      num_low_layers=1,
      remat_policy="none",
      dtype="float32",
    )
    c.text.update(length=8, dim=16)
    c.data.update(source="synthetic", num_classes=8)
    c.train.update(steps=200, batch_size=16, log_every=20, ckpt_every=100, keep=2, keep_every=0)
    c.optim.update(lr=3e-3, warmup_steps=20)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'tiny'")
  return c
