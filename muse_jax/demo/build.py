"""The demo's training stages, each a call into the library's own trainers.

1. a frozen text encoder (random T5-style weights, a word vocabulary of the captions);
2. the VQ tokenizer, trained by `trainers.vqgan` on shapes images (held-out pairs
   excluded);
3. pre-encoding of shapes examples to token ids + text embeddings (`data.preencode`);
4. the base transformer, trained by `trainers.transformer` on those shards;
5. the tokenizer's decoder, trained again on the base's guesses at real images' tokens
   (`refill`; encoder and codebook frozen);
6. the run's `pipeline.json`, so `muse-jax sample --checkpoint WORKDIR` works too: the
   finetuned decoder's tokenizer (the same encoder and codes) turns tokens into pixels.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections

from muse_jax import partitioning, runs
from muse_jax.convert import random_init
from muse_jax.data import preencode, shapes
from muse_jax.demo import refill
from muse_jax.trainers import transformer as transformer_trainer
from muse_jax.trainers import vqgan as vq_trainer
from muse_jax.trainers import vqgan_config

TEXT, TOKENIZER, DECODER = "text_encoder", "tokenizer", "decoder"
DATA, BASE = "data", "base"
TOKENS = "tokens"  # name of the ids feature in the pre-encoded shards ("ids_tokens")


def caption_words() -> list[str]:
  """Every word the shapes captions use."""
  words = ["a", *shapes.COUNT_WORDS.values(), *shapes.PALETTE]
  words += [w for s in shapes.SHAPES for w in (s, s + "s")]
  words += [w for r in shapes.RELATIONS for w in r.split()]
  return list(dict.fromkeys(words))


def shapes_source(config: ml_collections.ConfigDict, split: str = "train", length: int = 2**31 - 1):
  return shapes.ShapesSource(
    size=config.image_size,
    seed=config.seed,
    split=split,
    forms=tuple(dict(config.forms).items()),
    shape_weights=tuple(dict(config.shape_weights).items()),
    held_out=tuple(config.held_out),
    length=length,
  )


def make_text_encoder(config: ml_collections.ConfigDict, folder: pathlib.Path) -> None:
  """A random T5 v1.1-style encoder folder with a word-level tokenizer of the captions."""
  t = config.text
  vocab = random_init.write_word_tokenizer(folder, caption_words())
  hf_config = dict(
    model_type="t5",
    architectures=["T5EncoderModel"],
    vocab_size=vocab,
    d_model=t.d_model,
    d_kv=t.d_kv,
    num_heads=t.num_heads,
    d_ff=t.d_ff,
    num_layers=t.num_layers,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
  )
  random_init.write_random_folder(folder, hf_config, "float32", seed=config.seed)


def tokenizer_trainer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The VQ trainer's config for the demo's tokenizer: its model, losses and data."""
  t = config.tokenizer
  c = vqgan_config.base_config()
  c.model.update(patch_size=t.patch_size, channels=tuple(t.channels), num_res_blocks=t.num_res_blocks,
                 mid_num_res_blocks=1, latent_channels=t.latent_channels, embed_dim=t.embed_dim,
                 use_quant_conv=True, l2_normalize=True, codebook_size=t.codebook_size,
                 norm_groups=8)  # fmt: skip
  c.loss.update(
    reconstruction=t.loss, perceptual_weight=0.0, adversarial_weight=0.0, disc_start=10**9
  )
  c.disc.update(channels=(8, 16), stem_channels=8)  # never used: kept small in checkpoints
  c.data.update(source="shapes", resolution=config.image_size, output="uint8", seed=config.seed,
                num_threads=config.read_threads)  # fmt: skip
  c.data.shapes.update(size=config.image_size, seed=config.seed, split="train", forms=dict(config.forms),
                       shape_weights=dict(config.shape_weights), held_out=tuple(config.held_out))  # fmt: skip
  return c


def train_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The f=8 VQ tokenizer on shapes images (pixel loss + commitment: flat colours need no GAN)."""
  t = config.tokenizer
  c = tokenizer_trainer_config(config)
  # Random codes, no k-means and no restarts: 80% of the patches are white, and both would
  # spend dozens of near-identical codes on white, which the transformer then cannot predict
  # (measured: 184 codes for white patches, 4.5 nats, against 14 codes, 1.1 nats, this way).
  c.codebook.update(init="random", restart_every=0)
  c.train.update(steps=t.steps, batch_size=t.batch_size, log_every=50, image_every=0, eval_every=0,
                 ckpt_every=t.steps, keep=1, ema_decay=0.99, time_limit_s=t.time_limit_s)  # fmt: skip
  c.optim.update(lr=t.lr, warmup_steps=20)
  vq_trainer.train_and_evaluate(c, workdir)


def finetune_decoder(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The tokenizer's decoder trained again on the base's guesses at real images' tokens.

  Paper §2.5's decoder finetuning (encoder and codebook frozen), on grids where a share
  of each training image's tokens is re-predicted by the trained base (`refill`): the
  decoder learns to draw the real image from the base's kind of errors.
  """
  d = config.decoder
  c = tokenizer_trainer_config(config)
  c.finetune.update(checkpoint=str(workdir / TOKENIZER), copy_decoder=True)
  # A few hundred steps: a constant rate and no EMA. With the tokenizer's cosine decay and
  # EMA 0.99, 60 s of finetuning (on noisy codes) left the base's images no better.
  c.train.update(steps=d.steps, batch_size=d.batch_size, log_every=50, image_every=0, eval_every=0,
                 ckpt_every=d.steps, keep=1, ema_decay=0.0, time_limit_s=d.time_limit_s)  # fmt: skip
  c.optim.update(lr=d.lr, warmup_steps=20, schedule="constant", b2=0.999, weight_decay=0.0)
  source = dataclasses.replace(shapes_source(config), seed=config.seed + 1)  # unseen images
  data = refill.RefilledBatches(
    source, workdir / TOKENIZER, workdir / TEXT, config.text.max_length, workdir / BASE, d,
    d.batch_size, config.seed,
  )  # fmt: skip
  vq_trainer.train_and_evaluate(c, workdir / DECODER, data=data)


def encode_training_set(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Token ids + text embeddings of the training examples, as ArrayRecord shards."""
  p = config.preencode
  mesh = partitioning.make_mesh(devices=jax.local_devices())
  tokenizer = preencode.image_tokenizer(TOKENS, config.image_size, str(workdir / TOKENIZER), mesh)
  preencode.preencode(
    shapes_source(config, length=p.num_examples),
    workdir / DATA,
    tokenizers=[tokenizer],
    encode_text=preencode.text_encoder(
      str(workdir / TEXT), config.text.max_length, "float32", mesh
    ),
    batch_size=p.batch_size,
    num_threads=config.read_threads,
    examples_per_shard=p.num_examples,
    description="muse-jax demo: shapes train split",
  )


def base_trainer_config(
  config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> ml_collections.ConfigDict:
  """The transformer trainer's config for the demo's base (data in ``workdir``)."""
  b = config.base
  t = config.tokenizer
  grid = config.image_size // (t.patch_size * 2 ** (len(t.channels) - 1))
  c = transformer_trainer.base_config()
  c.model.update(vocab_size=config.tokenizer.codebook_size, grid=(grid, grid), width=b.width,
                 num_layers=b.num_layers, num_heads=b.num_heads, mlp_dim=b.mlp_dim,
                 scan_layers=b.scan_layers, relative_position=b.relative_position,
                 local_conv=b.local_conv, dtype="float32")  # fmt: skip
  c.text.update(length=config.text.max_length, dim=config.text.d_model)
  c.data.update(
    source="pre_encoded",
    path=str(workdir / DATA),
    ids_key=f"ids_{TOKENS}",
    num_threads=config.read_threads,
    seed=config.seed,
  )
  c.train.update(steps=b.steps, batch_size=b.batch_size, log_every=50, ckpt_every=b.steps, keep=1,
                 keep_every=0, time_limit_s=b.time_limit_s)  # fmt: skip
  c.optim.update(name=b.optimizer, lr=b.lr, warmup_steps=b.warmup_steps, weight_decay=0.01, b2=0.99)
  c.mesh.shape = dict(data=-1, fsdp=1, tensor=1)
  c.mesh.num_devices = _batch_devices(b.batch_size)
  return c


def train_base(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """The base masked transformer on the pre-encoded shards."""
  transformer_trainer.train_and_evaluate(base_trainer_config(config, workdir), workdir / BASE)


def _batch_devices(batch_size: int) -> int:
  """The most local devices (up to all) that split the batch evenly."""
  n = jax.local_device_count()
  while batch_size % n:
    n -= 1
  return n


def write_pipeline(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  s = config.sampler
  runs.write_layout(
    workdir,
    tokenizer=DECODER,
    text_encoder=TEXT,
    text_max_length=config.text.max_length,
    base=BASE,
    base_sampler=dict(
      schedule=s.schedule,
      num_steps=s.num_steps,
      guidance_scale=s.guidance_scale,
      guidance_schedule=s.guidance_schedule,
      temperature=s.temperature,
      choice_temperature=s.choice_temperature,
    ),
  )
