"""Trainer of the Muse base and super-resolution transformers (paper §2.3, §2.4, §2.6).

One trainer serves both models; they differ in the model and in one batch field
(``low_res_ids``). Each step:

1. draws a masking rate per example from the arccos distribution and masks that
   many random positions of the target ids (``muse_jax.masking.arccos_mask``);
2. replaces the text of ``cond_drop_prob`` (10%) of the examples with the
   unconditional embedding, which is what classifier-free guidance needs at sampling;
3. predicts every position and takes the cross-entropy on the masked ones only
   (optional label smoothing), averaged over micro-batches when accumulating;
4. applies Adafactor (or AdamW, or Muon) with warmup + cosine decay (``muse_jax.optim``).

Scale: parameters carry logical axis names; the config's mesh (data, fsdp, tensor)
and rules turn them into shardings. The train state is created already sharded
(``jax.eval_shape`` -> shardings -> ``jax.jit(init, out_shardings=...)``) or
restored straight into those shardings; the step is one ``jax.jit`` with explicit
in/out shardings and the state donated. On a multi-host job each process feeds its
own slice of the global batch.

Preemption: checkpoints (orbax, asynchronous) every ``ckpt_every`` steps carry the
state and every process's data-iterator state; a restarted job resumes from the
latest by itself and replays exactly the batches an uninterrupted run would have
seen. A NaN or Inf loss stops the run before anything is saved from it.

Launch: ``muse-jax train --config configs/muse_base_632m.py:tiny --workdir /tmp/muse``.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from muse_jax import checkpointing, losses, masking, optim, partitioning
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer
from muse_jax.trainers import common, token_batches


def base_config() -> ml_collections.ConfigDict:
  """Every knob of the trainer with the paper's defaults; configs/ files override it."""
  c = ml_collections.ConfigDict()
  c.model = dict(
    kind="base",  # "base" or "superres".
    vocab_size=8192,  # K codes of the target tokenizer; id K is the mask token.
    grid=(16, 16),  # Token grid of the targets.
    width=1280,
    num_layers=24,
    num_heads=20,
    mlp_dim=5120,
    attention="full",  # "full" or "multi_axis".
    window=8,  # Multi-axis block / grid side.
    relative_position=False,  # 2D relative position bias in full self-attention (not Muse's).
    local_conv=False,  # Depthwise 3x3 convs over the grid on the attention and MLP inputs.
    dropout_rate=0.0,
    scan_layers=True,
    remat_policy="none",  # "none", "full", "dots", "dots_no_batch".
    dtype="bfloat16",  # Computation dtype; parameters stay float32.
    param_dtype="float32",
    # Super-res only:
    low_vocab_size=8192,
    low_grid=(16, 16),
    num_low_layers=16,
  )
  c.text = dict(length=128, dim=4096)  # T5-XXL outputs, 128 tokens (Imagen's length).
  c.data = dict(
    source="synthetic",  # "synthetic" or "pre_encoded".
    path="",  # Pre-encoded shards.
    ids_key="ids_256",  # Target-ids feature of the shards.
    low_res_ids_key="",  # Low-res ids feature (super-res).
    uncond_path="",  # .npz of the empty prompt's text ("" = uncond.npz by the shards, or zeros).
    num_workers=0,  # Pre-encoded reading: grain worker processes.
    num_threads=16,  # Pre-encoded reading: threads per process (0: in the training loop's).
    seed=0,
    num_classes=16,  # Synthetic task only.
    noise=0.1,  # Synthetic task only.
    fixed_batch=False,  # Synthetic task only: one batch forever.
  )
  c.train = dict(
    steps=1_000_000,
    batch_size=512,  # Global batch.
    grad_accum=1,  # Micro-batches per step (lax.scan).
    seed=0,
    label_smoothing=0.0,
    cond_drop_prob=0.1,  # Text replaced by the unconditional embedding (CFG).
    min_mask_rate=0.0,
    rect_mask_prob=0.0,  # Masks a rectangle instead of random positions.
    log_every=100,
    ckpt_every=1000,  # A preempted job loses at most this many steps.
    keep=3,  # Newest checkpoints kept...
    # ...plus every multiple of this, forever, for the paper's offline averaging (0: none).
    # Each holds the whole state (3B: ~26 GB with fp32 momentum); delete old ones as needed.
    keep_every=5000,
    async_checkpoints=True,
    distributed="auto",  # jax.distributed.initialize(): "auto", "on", "off".
    time_limit_s=0.0,  # Stop (saving a checkpoint) this long after the call began (0: none).
  )
  c.optim = dict(
    name="adafactor",  # or "adamw", "adam", "muon" (optim.make_optimizer)
    lr=1e-4,
    warmup_steps=5000,
    schedule="cosine",
    end_lr_factor=0.0,
    b1=0.9,
    b2=0.96,
    weight_decay=0.045,
    grad_clip_norm=1.0,
    momentum_dtype="float32",
  )
  c.mesh = dict(
    shape=dict(data=1, fsdp=-1, tensor=1),  # -1: all remaining devices.
    num_devices=0,  # Use the first n devices (0: all).
    rules=None,  # None: partitioning.DEFAULT_RULES; else [[logical, mesh axes], ...].
  )
  c.hardware = dict(peak_flops_per_device=0.0)  # 0: look up by device kind (for MFU).
  c.sample = dict(
    every=0,  # Steps between sample grids in TensorBoard (0: never).
    vq_checkpoint="",  # VQGAN checkpoint to decode ids to pixels; needed for grids.
    num=4,
    steps=24,
    guidance=4.0,
  )
  return c


def make_model(config: ml_collections.ConfigDict) -> MaskedTransformer:
  """The model a ``model`` config section describes."""
  m = config
  if m.get("mlp_conv", False):
    raise ValueError(
      "model.mlp_conv=True: this run was trained with the convolution inside the MLPs, which "
      "model.local_conv replaced (2026-11-27: before the attention and the MLP, not inside); "
      "its weights do not fit the model any more. Train it again (muse-jax demo: a new workdir)"
    )
  common_fields = dict(
    vocab_size=m.vocab_size,
    grid=tuple(m.grid),
    width=m.width,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    mlp_dim=m.mlp_dim,
    attention=m.attention,
    window=m.window,
    # Runs saved before these options existed have no such keys.
    relative_position=m.get("relative_position", False),
    local_conv=m.get("local_conv", False),
    dropout_rate=m.dropout_rate,
    scan_layers=m.scan_layers,
    remat_policy=m.remat_policy,
    dtype=jnp.dtype(m.dtype),
    param_dtype=jnp.dtype(m.param_dtype),
  )
  if m.kind == "base":
    return MaskedTransformer(**common_fields)
  if m.kind == "superres":
    return SuperResTransformer(
      **common_fields,
      low_vocab_size=m.low_vocab_size,
      low_grid=tuple(m.low_grid),
      num_low_layers=m.num_low_layers,
    )
  raise ValueError(f"unknown model kind {m.kind!r}; expected 'base' or 'superres'")


def is_superres(config: ml_collections.ConfigDict) -> bool:
  return config.model.kind == "superres"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken.
  params: Any  # The model's parameters (float32).
  opt_state: Any  # The optimizer's state.


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> tuple[jax.Array, ...]:
  """Zero inputs of the right shapes, for init and shape evaluation."""
  h, w = config.model.grid
  args = [
    jnp.zeros((batch, h * w), jnp.int32),
    jnp.zeros((batch, config.text.length, config.text.dim), jnp.float32),
    jnp.ones((batch, config.text.length), bool),
  ]
  if is_superres(config):
    lh, lw = config.model.low_grid
    args.append(jnp.zeros((batch, lh * lw), jnp.int32))
  return tuple(args)


def mesh_and_rules(
  config: ml_collections.ConfigDict,
) -> tuple[jax.sharding.Mesh, partitioning.Rules]:
  devices = jax.devices()
  if config.mesh.num_devices:
    devices = devices[: config.mesh.num_devices]
  mesh = partitioning.make_mesh(dict(config.mesh.shape), devices)
  return mesh, partitioning.rules_from_config(config.mesh.rules)


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """``jax.eval_shape`` of the model's init: boxed ShapeDtypeStructs with axis names."""
  model = make_model(config.model)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config))["params"])


def partition_spec_table(
  config: ml_collections.ConfigDict, rules: partitioning.Rules | None = None
) -> dict:
  """{parameter path: {"shape", "logical", "mesh"}} for golden-file comparisons."""
  rules = partitioning.DEFAULT_RULES if rules is None else rules
  boxed = abstract_params(config)
  flat = jax.tree_util.tree_flatten_with_path(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )[0]
  table = {}
  for path, leaf in flat:
    names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    spec = nn.logical_to_mesh_axes(names, rules) if names else ()
    table["/".join(str(getattr(k, "key", k)) for k in path)] = {
      "shape": list(value.shape),
      "logical": list(names),
      "mesh": [list(s) if isinstance(s, tuple) else s for s in spec],
    }
  return table


def state_shardings(
  config: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  rules: partitioning.Rules,
  boxed: Any = None,
) -> tuple[TrainState, TrainState]:
  """``(abstract_state, shardings)``: the train state's shapes and where each lives.

  ``boxed``: the parameters' ``abstract_params`` when the caller has them already.
  """
  boxed = abstract_params(config) if boxed is None else boxed
  param_shardings = partitioning.logical_shardings(boxed, mesh, rules)
  params = partitioning.unbox_abstract(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  shardings = TrainState(
    step=partitioning.replicated(mesh),
    params=param_shardings,
    opt_state=optim.opt_state_shardings(opt_state, param_shardings),
  )
  abstract = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state
  )
  return abstract, shardings


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def init_state(
  config: ml_collections.ConfigDict,
  model: MaskedTransformer,
  tx: optax.GradientTransformation,
  shardings: TrainState,
) -> TrainState:
  """Creates the train state with every array born on its devices."""

  def init(rng):
    params = nn.meta.unbox(model.init(rng, *dummy_inputs(config))["params"])
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))

  rng = jax.random.fold_in(jax.random.key(config.train.seed), 0x5EED)
  return jax.jit(init, out_shardings=shardings)(rng)


def make_train_step(
  config: ml_collections.ConfigDict,
  model: MaskedTransformer,
  tx: optax.GradientTransformation,
  schedule: optim.Schedule,
):
  """The pure step ``(state, batch, uncond_emb, uncond_mask) -> (state, metrics)``."""
  t = config.train
  superres = is_superres(config)
  mask_id = model.mask_id
  grid = tuple(config.model.grid)

  def loss_fn(params, batch, rng, uncond_emb, uncond_mask):
    k_mask, k_cond, k_dropout = jax.random.split(rng, 3)
    ids = batch["ids"]  # [B, L]
    b, length = ids.shape
    mask = masking.arccos_mask(
      k_mask, b, length, min_rate=t.min_mask_rate, rect_prob=t.rect_mask_prob, grid=grid
    )
    inputs = jnp.where(mask, mask_id, ids)
    drop = jax.random.uniform(k_cond, (b,)) < t.cond_drop_prob
    text_emb = jnp.where(
      drop[:, None, None], uncond_emb[None], batch["text_emb"].astype(jnp.float32)
    )
    text_mask = jnp.where(drop[:, None], uncond_mask[None], batch["text_mask"])
    args = (inputs, text_emb, text_mask) + ((batch["low_res_ids"],) if superres else ())
    logits = model.apply({"params": params}, *args, train=True, rngs={"dropout": k_dropout})
    loss, accuracy = losses.masked_cross_entropy(
      logits, ids, mask, label_smoothing=t.label_smoothing
    )
    return loss, {"accuracy": accuracy, "mask_rate": jnp.mean(mask.astype(jnp.float32))}

  def train_step(state: TrainState, batch, uncond_emb, uncond_mask):
    # Built inside the trace (a constant), so lowering for a remote topology works too.
    rng = jax.random.fold_in(jax.random.key(t.seed), state.step)
    grad_fn = jax.value_and_grad(
      lambda p, b, r: loss_fn(p, b, r, uncond_emb, uncond_mask), has_aux=True
    )
    (loss, aux), grads = optim.accumulate_gradients(grad_fn, state.params, batch, rng, t.grad_accum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "train/loss": loss,
      "train/masked_accuracy": aux["accuracy"],
      "train/mask_rate": aux["mask_rate"],
      "train/lr": schedule(state.step),
      "train/grad_norm": optax.tree.norm(grads),
      "train/param_norm": optax.tree.norm(params),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _batch_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  keys = {"ids": 2, "text_emb": 3, "text_mask": 2}
  if is_superres(config):
    keys["low_res_ids"] = 2
  return {k: partitioning.batch_sharding(mesh, n) for k, n in keys.items()}


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> TrainState:
  """Trains (resuming from ``workdir``'s latest checkpoint if any) to ``train.steps``.

  Args:
    config: a config like ``base_config()``.
    workdir: checkpoints go to ``workdir/checkpoints``, TensorBoard events to
      ``workdir/tensorboard``.

  Returns:
    The final train state.
  """
  common.maybe_initialize_distributed(config.train.distributed)
  time_limit = common.TimeLimit(config.train.get("time_limit_s", 0.0))
  workdir = pathlib.Path(workdir)
  mesh, rules = mesh_and_rules(config)
  t = config.train
  model = make_model(config.model)
  boxed = abstract_params(config)
  # Muon's matrices are read from the axis names.
  tx, schedule = optim.make_optimizer(config.optim, t.steps, nn.get_partition_spec(boxed))
  local_batch = common.local_batch_size(t.batch_size)
  batch_devices = mesh.shape[partitioning.DATA] * mesh.shape[partitioning.FSDP]
  if t.batch_size % batch_devices or (t.batch_size // t.grad_accum) % batch_devices:
    raise ValueError(
      f"train.batch_size {t.batch_size} / grad_accum {t.grad_accum} must split over the "
      f"{batch_devices} devices of the mesh's data x fsdp axes"
    )
  writer = common.MetricWriter(workdir / "tensorboard")
  ckpt = checkpointing.Checkpointer(
    workdir / "checkpoints",
    save_every=t.ckpt_every,
    keep=t.keep,
    keep_every=t.keep_every or None,
    async_save=t.async_checkpoints,
  )
  ckpt.write_config(config)
  data = token_batches.make_batches(config, local_batch=local_batch, superres=is_superres(config))
  uncond_emb, uncond_mask = token_batches.unconditional_text(config)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = state_shardings(config, tx, mesh, rules, boxed)
    restored = ckpt.restore_or_none(_with_shardings(abstract, shardings))
    if restored is None:
      state = init_state(config, model, tx, shardings)
    else:
      state = restored.state
      _restore_data_state(data, restored.extras)
    start = int(common.fetch(state.step))
    replicated = partitioning.replicated(mesh)
    batch_shardings = _batch_shardings(config, mesh)
    batch_keys = tuple(batch_shardings)  # The pipeline may yield more (captions, pooled text).
    step_fn = jax.jit(
      make_train_step(config, model, tx, schedule),
      in_shardings=(shardings, batch_shardings, replicated, replicated),
      out_shardings=(shardings, replicated),
      donate_argnums=(0,),
    )
    uncond = (
      jax.device_put(jnp.asarray(uncond_emb), replicated),
      jax.device_put(jnp.asarray(uncond_mask), replicated),
    )
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    logging.info(
      "Model %s: %.1fM parameters; mesh %s; global batch %d; steps %d -> %d.",
      config.model.kind,
      num_params / 1e6,
      dict(mesh.shape),
      t.batch_size,
      start,
      t.steps,
    )
    flops_per_step = 3 * model.forward_flops(config.text.length, config.text.dim) * t.batch_size
    tokens_per_step = t.batch_size * model.length
    peak = common.peak_flops_per_device(config.hardware.peak_flops_per_device)
    sampler = _make_sampler(config, model, mesh) if config.sample.every else None
    timer = common.StepTimer(start)
    finite = jnp.asarray(True)
    last_loss = float("nan")
    progress = tqdm.tqdm(
      total=t.steps, initial=start, disable=jax.process_index() != 0, desc="train", unit="step"
    )
    try:
      for step in range(start + 1, t.steps + 1):
        local = next(data)
        batch = common.global_batch({k: local[k] for k in batch_keys}, mesh)
        state, metrics = step_fn(state, batch, *uncond)
        finite = (
          finite & jnp.isfinite(metrics["train/loss"]) & jnp.isfinite(metrics["train/grad_norm"])
        )
        progress.update(1)
        out_of_time = time_limit.reached()
        must_save = ckpt.should_save(step) or step == t.steps or out_of_time
        if step % t.log_every == 0 or must_save or step == start + 1:
          values = common.fetch(metrics)
          last_loss = float(values["train/loss"])
          common.raise_unless_finite(finite, step, last_loss, ckpt)
          if step == start + 1:
            timer.reset(step)  # Leave compilation out of the step time.
          if step % t.log_every == 0:
            values.update(
              timer.lap(
                step,
                tokens_per_step=tokens_per_step,
                flops_per_step=flops_per_step,
                peak_flops=peak,
              )
            )
            writer.scalars(step, values)
            progress.set_postfix(loss=f"{last_loss:.4f}")
        if sampler is not None and step % config.sample.every == 0:
          writer.images(step, sampler(state.params, batch, step))
        if common.save_or_stop(
          ckpt, step, state, lambda: {"data": common.gather_process_states(data.get_state())},
          must_save=must_save, out_of_time=out_of_time, time_limit_s=t.time_limit_s,
        ):  # fmt: skip
          break
    finally:
      progress.close()
      ckpt.close()
      writer.close()
      if hasattr(data, "close"):
        data.close()  # grain worker processes
  logging.info("Finished at step %d, last loss %.5f.", int(common.fetch(state.step)), last_loss)
  return state


def _restore_data_state(data: Any, extras: dict) -> None:
  states = extras.get("data")
  if states is None:
    return
  if len(states) != jax.process_count():
    logging.warning(
      "Checkpoint holds data states of %d processes but this job has %d; the input stream "
      "starts afresh.",
      len(states),
      jax.process_count(),
    )
    return
  data.set_state(states[jax.process_index()])


def _make_sampler(
  config: ml_collections.ConfigDict, model: MaskedTransformer, mesh: jax.sharding.Mesh
):
  """Sample grids for TensorBoard; see ``muse_jax.trainers.transformer_samples``."""
  from muse_jax.trainers import transformer_samples

  return transformer_samples.make_sampler(config, model, mesh)
