"""Builds tiny run folders on disk (random weights, real file formats) for pipeline tests.

A run written here has the layout `muse-jax train-vq` / `muse-jax train` leave behind
(config.json + orbax checkpoints), the tiny T5 text-encoder fixture, and a
pipeline.json, so `runs.load_pipeline` exercises every loader.

Base: 4x4 tokens of an f=4 tokenizer (16 px); super-res: 8x8 tokens of another f=4
tokenizer (32 px).
"""

import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax import checkpointing, runs
from muse_jax.text import TextEncoder
from muse_jax.trainers import transformer as transformer_trainer
from muse_jax.trainers import vqgan_config

K = 32
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TEXT_FOLDER = FIXTURES / "text" / "t5_v1_1"


def _save(workdir: pathlib.Path, config, state) -> None:
  with checkpointing.Checkpointer(workdir / "checkpoints", save_every=1, async_save=False) as ckpt:
    ckpt.write_config(config)
    ckpt.save(1, state, force=True)


def write_tokenizer(workdir: pathlib.Path, seed: int) -> None:
  config = vqgan_config.base_config()
  config.model.update(
    channels=(8, 8, 16),
    num_res_blocks=1,
    mid_num_res_blocks=1,
    latent_channels=8,
    codebook_size=K,
    norm_groups=4,
  )
  model = vqgan_config.make_model(config.model)
  params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)))["params"])
  _save(workdir, config, {"params": params, "ema_params": params})


def write_transformer(workdir: pathlib.Path, seed: int, text_dim: int, superres: bool) -> None:
  config = transformer_trainer.base_config()
  config.model.update(
    vocab_size=K,
    width=32,
    num_layers=1,
    num_heads=2,
    mlp_dim=64,
    scan_layers=False,
    dtype="float32",
  )
  if superres:
    config.model.update(kind="superres", grid=(8, 8), attention="full", low_vocab_size=K, low_grid=(4, 4),
                        num_low_layers=1)  # fmt: skip
  else:
    config.model.update(grid=(4, 4))
  config.text.update(length=8, dim=text_dim)
  model = transformer_trainer.make_model(config.model)
  params = nn.meta.unbox(
    model.init(jax.random.key(seed), *transformer_trainer.dummy_inputs(config))["params"]
  )
  # Larger weights than the init's, so that the tokens depend clearly on the text.
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 else p, params)
  _save(workdir, config, {"step": jnp.int32(1), "params": params})


def make_run(run: pathlib.Path, *, superres: bool = True, num_steps: int = 3) -> pathlib.Path:
  text_dim = TextEncoder.from_pretrained(TEXT_FOLDER).embed_dim
  shutil.copytree(TEXT_FOLDER, run / "text_encoder")
  write_tokenizer(run / "tokenizer", seed=0)
  write_transformer(run / "base", seed=1, text_dim=text_dim, superres=False)
  layout = dict(
    tokenizer="tokenizer",
    text_encoder="text_encoder",
    text_max_length=8,
    base="base",
    base_sampler={"num_steps": num_steps},
    superres_sampler={"num_steps": 2},
  )
  if superres:
    write_tokenizer(run / "tokenizer_hr", seed=3)
    write_transformer(run / "superres", seed=2, text_dim=text_dim, superres=True)
    layout.update(superres="superres", superres_tokenizer="tokenizer_hr")
  runs.write_layout(run, **layout)
  return run
