"""Trainer of the VQGAN tokenizers (paper §2.2, §2.5, App. A.2).

``train_and_evaluate(config, workdir)`` trains a VQGAN with reconstruction, perceptual
(LPIPS, weights from a local file), adversarial (StyleGAN2 discriminator; hinge or
non-saturating), R1 and LeCAM losses plus the quantizer's commitment loss, Adam
(β 0.9, 0.99) with warmup + cosine for both networks, an EMA of the generator, and
codebook upkeep (k-means init, dead-code restarts). The step itself is in
``vqgan_step.py``; the config and the model builders in ``vqgan_config.py``.

Scale: parameters carry logical axis names and the config's mesh/rules shard them
(data parallel by default); the state is created or restored directly into its
shardings; the step is one ``jax.jit`` with explicit shardings and a donated state.

Preemption and failures: orbax checkpoints (``muse_jax.checkpointing``) every
``ckpt_every`` steps hold the state and the data iterator's state, and a restarted run
resumes from the latest by itself. A NaN / Inf loss stops the run with the step number;
nothing is saved from the bad state, so the last good checkpoint is kept.

Decoder finetuning (§2.5): ``finetune.checkpoint`` names a trained tokenizer (our
workdir or a diffusers VQModel folder); its encoder, quant_conv and codebook are copied
and frozen while a new (larger) decoder trains on the same losses. ``finetune.code_noise``
also feeds that decoder codes swapped for near neighbours at that rate, so that it
renders a transformer's imperfect token grids closer to clean images (``vqgan_step``).

``muse_jax.vq_tokenizer.load_tokenizer(path)`` gives other stages ``(model, params)`` from our workdir (EMA
params) or from a diffusers VQModel / aMUSEd pipeline folder.

Launch: ``muse-jax train-vq --config configs/vqgan_f16_256.py:tiny --workdir /tmp/vq``.
"""

from __future__ import annotations

from collections.abc import Iterator
import math
import os
import pathlib
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from muse_jax import checkpointing, optim, partitioning
from muse_jax import images as images_lib
from muse_jax.data import pipeline
from muse_jax.models import quantizer as quantizer_lib
from muse_jax.models.perceptual import LPIPS
from muse_jax.trainers import common
from muse_jax.trainers.vqgan_config import make_discriminator, make_model
from muse_jax.trainers.vqgan_step import (
  TrainState,
  kmeans_codebook,
  make_eval_fn,
  make_train_step,
  with_frozen,
)


def _dummy(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
  s = config.data.resolution
  return jnp.zeros((1, s, s, 3), jnp.float32)


def load_perceptual(config: ml_collections.ConfigDict) -> tuple[LPIPS | None, Any]:
  """The LPIPS net and params, or ``(None, None)`` with one warning when off."""
  L = config.loss
  if not L.perceptual_weight:
    return None, None
  from muse_jax.convert.lpips import load_lpips_params

  path = L.perceptual_weights
  if not path or not os.path.isfile(path):
    where = f"no file at {path!r}" if path else "loss.perceptual_weights is empty"
    logging.warning(
      "Perceptual loss is OFF (weight %g requested): %s. Expected a local LPIPS/VGG16 safetensors file"
      " (see muse_jax/convert/lpips.py for how to make one).",
      L.perceptual_weight,
      where,
    )
    return None, None
  params, has_lin = load_lpips_params(path)
  logging.info(
    "Perceptual loss: LPIPS%s from %s, weight %g.",
    "" if has_lin else " (no lin heads)",
    path,
    L.perceptual_weight,
  )
  return LPIPS(use_lin=has_lin), params


def mesh_and_rules(
  config: ml_collections.ConfigDict,
) -> tuple[jax.sharding.Mesh, partitioning.Rules]:
  devices = jax.devices()
  if config.mesh.num_devices:
    devices = devices[: config.mesh.num_devices]
  return partitioning.make_mesh(dict(config.mesh.shape), devices), partitioning.rules_from_config(
    config.mesh.rules
  )


def _optimizers(config, boxed_params, boxed_disc_params):
  """``(tx, disc_tx, schedule)``; each optimizer is given its parameters' logical axis
  names (``eval_shape`` boxes), which Muon reads its matrices from."""
  frozen = bool(config.finetune.checkpoint)
  steps = config.train.steps
  tx, schedule = optim.make_optimizer(config.optim, steps, nn.get_partition_spec(boxed_params))
  axes = nn.get_partition_spec(boxed_disc_params)
  disc_tx, _ = optim.make_optimizer(config.disc_optim, steps, axes)
  return with_frozen(tx, partitioning.unbox_abstract(boxed_params), frozen), disc_tx, schedule


def state_shardings(
  model, boxed, dboxed, tx, disc_tx, mesh, rules
) -> tuple[TrainState, TrainState]:
  """``(abstract_state, shardings)`` of the train state, from the ``eval_shape`` trees (with
  their axis names) of the model's and the discriminator's parameters."""
  p_sh = partitioning.logical_shardings(boxed, mesh, rules)
  d_sh = partitioning.logical_shardings(dboxed, mesh, rules)
  params, dparams = partitioning.unbox_abstract(boxed), partitioning.unbox_abstract(dboxed)
  opt, dopt = jax.eval_shape(tx.init, params), jax.eval_shape(disc_tx.init, dparams)
  rep = partitioning.replicated(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  abstract = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params,
    ema_params=params,
    opt_state=opt,
    disc_params=dparams,
    disc_opt_state=dopt,
    lecam={"real": scalar, "fake": scalar},
    code_usage=jax.ShapeDtypeStruct((model.codebook_size,), jnp.float32),
  )
  shardings = TrainState(
    step=rep,
    params=p_sh,
    ema_params=p_sh,
    opt_state=optim.opt_state_shardings(opt, p_sh),
    disc_params=d_sh,
    disc_opt_state=optim.opt_state_shardings(dopt, d_sh),
    lecam={"real": rep, "fake": rep},
    code_usage=rep,
  )
  return abstract, shardings


def init_state(config, model, disc, tx, disc_tx, shardings, base_params=None) -> TrainState:
  """A fresh state, born on its devices; ``base_params`` overrides the generator's subtrees."""
  x = _dummy(config)

  def init(rng, base):
    k1, k2 = jax.random.split(rng)
    params = nn.meta.unbox(model.init(k1, x)["params"])
    if base is not None:
      params = {**params, **base}
    dparams = nn.meta.unbox(disc.init(k2, x)["params"])
    k = model.codebook_size
    return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      disc_params=dparams,
      disc_opt_state=disc_tx.init(dparams),
      lecam={"real": jnp.zeros([], jnp.float32), "fake": jnp.zeros([], jnp.float32)},
      code_usage=jnp.zeros((k,), jnp.float32),
    )

  rng = jax.random.fold_in(jax.random.key(config.train.seed), 0x5EED)
  state = jax.jit(init, out_shardings=shardings)(rng, base_params)
  return state.replace(ema_params=_copy(state.params))


def _copy(tree: Any) -> Any:
  """Fresh buffers (params and EMA must not share them: the step donates both)."""
  return jax.tree.map(lambda x: x.copy(), tree)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _check_code_noise(finetune: ml_collections.ConfigDict, codebook_size: int) -> None:
  rate, k = finetune.code_noise, finetune.noise_neighbours
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"finetune.code_noise is {rate}; expected a probability in [0, 1)")
  if rate and not finetune.checkpoint:
    raise ValueError(
      f"finetune.code_noise={rate} needs finetune.checkpoint: code noise trains a decoder "
      "against a frozen codebook"
    )
  if rate and not 1 <= k < codebook_size:
    raise ValueError(
      f"finetune.noise_neighbours is {k}; expected 1 <= k < codebook_size {codebook_size}"
    )


def _codebook(model: nn.Module) -> jax.Array:
  return model.quantize.codebook()  # [K, D] as the lookup uses it (l2-normalised or not)


def _frozen_subtrees(config, model, abstract_params) -> dict[str, Any]:
  """Encoder, quant_conv and codebook of ``finetune.checkpoint``, checked against ours."""
  src = config.finetune.checkpoint
  from muse_jax.vq_tokenizer import load_tokenizer

  other_model, other = load_tokenizer(src)
  out = {}
  keys = ["encoder", "quant_conv", "quantize"]
  if config.finetune.copy_decoder:
    keys += ["post_quant_conv", "decoder"]
  for key in keys:
    if key not in abstract_params:
      continue
    if key not in other:
      raise ValueError(f"finetune.checkpoint {src} has no {key!r} params; our model needs them")
    want = jax.tree.map(lambda a: tuple(a.shape), abstract_params[key])
    got = jax.tree.map(lambda a: tuple(a.shape), other[key])
    if want != got:
      flat_w, flat_g = (
        flax.traverse_util.flatten_dict(want, sep="/"),
        flax.traverse_util.flatten_dict(got, sep="/"),
      )
      diff = sorted(k for k in set(flat_w) | set(flat_g) if flat_w.get(k) != flat_g.get(k))[:3]
      detail = "; ".join(
        f"{key}/{k}: config {flat_w.get(k)} vs checkpoint {flat_g.get(k)}" for k in diff
      )
      raise ValueError(
        f"finetune.checkpoint {src} does not match the config's {key} (codebook_size "
        f"{model.codebook_size} vs {other_model.codebook_size}): {detail}"
      )
    out[key] = other[key]
  logging.info("Decoder finetuning: encoder + codebook frozen from %s.", src)
  return out


# ----------------------------------------------------------------------------- data


def make_image_batches(
  config: ml_collections.ConfigDict, local_batch: int
) -> Iterator[dict[str, np.ndarray]]:
  """Batches ``{"image": uint8 [b, S, S, 3]}`` with ``get_state`` / ``set_state``."""
  return pipeline.image_batches(config.data, local_batch)


def _restore_data_state(data: Any, extras: dict) -> None:
  states = extras.get("data")
  if states is None or not hasattr(data, "set_state"):
    return
  if len(states) != jax.process_count():
    logging.warning("Checkpoint holds data states of %d processes, this job has %d; data restarts.",
                    len(states), jax.process_count())  # fmt: skip
    return
  data.set_state(states[jax.process_index()])


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  data: Iterator[dict[str, np.ndarray]] | None = None,
  eval_images: np.ndarray | None = None,
) -> TrainState:
  """Trains (resuming from ``workdir`` if it holds a checkpoint) up to ``train.steps``.

  Args:
    config: like ``base_config()``.
    workdir: ``checkpoints/`` and ``tensorboard/`` go here.
    data: optional iterator of ``{"image": uint8 [b, S, S, 3]}`` local batches (with
      ``get_state``/``set_state`` for exact resumption); default: ``config.data``. With
      decoder finetuning a batch may add ``"ids"``, int [b, S/f, S/f]: the codes the
      decoder sees instead of the encoder's (``vqgan_step``).
    eval_images: optional uint8 [N, S, S, 3] held-out images for PSNR and grids;
      default: the first batch.

  Returns:
    The final train state.
  """
  time_limit = common.TimeLimit(config.train.time_limit_s)  # set-up and compilation count too
  common.maybe_initialize_distributed(config.train.distributed)
  workdir = pathlib.Path(workdir)
  t = config.train
  mesh, rules = mesh_and_rules(config)
  model, disc = make_model(config.model), make_discriminator(config.disc)
  x = _dummy(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x)["params"])
  dboxed = jax.eval_shape(lambda: disc.init(jax.random.key(0), x)["params"])
  abstract_params = partitioning.unbox_abstract(boxed)
  tx, disc_tx, schedule = _optimizers(config, boxed, dboxed)
  frozen = bool(config.finetune.checkpoint)
  if config.finetune.checkpoint.startswith("REQUIRED"):
    raise ValueError(f"decoder finetuning needs a trained tokenizer: {config.finetune.checkpoint}")
  _check_code_noise(config.finetune, model.codebook_size)
  local_batch = common.local_batch_size(t.batch_size)
  batch_devices = mesh.shape[partitioning.DATA] * mesh.shape[partitioning.FSDP]
  if t.batch_size % batch_devices:
    raise ValueError(
      f"train.batch_size {t.batch_size} must split over the {batch_devices} data x fsdp devices"
    )
  lpips, lpips_params = load_perceptual(config)
  writer = common.MetricWriter(workdir / "tensorboard")
  ckpt = checkpointing.Checkpointer(
    workdir / "checkpoints", save_every=t.ckpt_every, keep=t.keep, async_save=t.async_checkpoints
  )
  ckpt.write_config(config)
  data = make_image_batches(config, local_batch) if data is None else data

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = state_shardings(model, boxed, dboxed, tx, disc_tx, mesh, rules)
    restored = ckpt.restore_or_none(_with_shardings(abstract, shardings))
    first = None
    if restored is None:
      base = _frozen_subtrees(config, model, abstract_params) if frozen else None
      state = init_state(config, model, disc, tx, disc_tx, shardings, base)
      if config.codebook.init == "kmeans" and not frozen:
        first = next(data)
        imgs = common.global_batch(first, mesh)["image"]
        rng = jax.random.fold_in(jax.random.key(t.seed), 0xC0DE)
        params = jax.jit(
          lambda p, x, r: kmeans_codebook(model, p, x, r), out_shardings=shardings.params
        )(state.params, imgs, rng)
        state = state.replace(params=params, ema_params=_copy(params))
        logging.info(
          "Codebook initialised by k-means on %d latents.",
          imgs.shape[0] * (imgs.shape[1] // model.downsample_factor) ** 2,
        )
    else:
      state = restored.state
      _restore_data_state(data, restored.extras)
    start = int(common.fetch(state.step))

    rep = partitioning.replicated(mesh)
    batch_sh = {"image": partitioning.batch_sharding(mesh, 4)}
    lpips_params = jax.device_put(lpips_params, rep) if lpips_params is not None else None

    neighbours = None
    if config.finetune.code_noise:  # of the frozen codebook, once
      codebook = jax.jit(lambda p: model.apply({"params": p}, method=_codebook))(state.params)
      k = config.finetune.noise_neighbours
      neighbours = jax.device_put(quantizer_lib.nearest_codes(codebook, k), rep)
      logging.info("Code noise: %g of the tokens swapped for one of their %d nearest codes.",
                   config.finetune.code_noise, k)  # fmt: skip

    def compile_step(use_gan, with_ids):
      fn = make_train_step(config, model, disc, lpips, tx, disc_tx, schedule, use_gan=use_gan,
                           frozen_encoder=frozen, code_neighbours=neighbours)  # fmt: skip
      ids_sh = {"ids": partitioning.batch_sharding(mesh, 3)} if with_ids else {}
      return jax.jit(
        fn,
        in_shardings=(shardings, {**batch_sh, **ids_sh}, rep),
        out_shardings=(shardings, rep),
        donate_argnums=(0,),
      )

    steps = {}
    eval_fn = jax.jit(make_eval_fn(model), in_shardings=(shardings.params, None))
    if eval_images is None:
      if first is None:
        first = next(data)
      eval_images = np.asarray(first["image"][: t.eval_batch])
    logging.info(
      "VQGAN: %.1fM generator / %.1fM discriminator parameters; f=%d, K=%d; mesh %s; batch %d; steps %d -> %d%s.",
      sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)) / 1e6,
      sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.disc_params)) / 1e6,
      model.downsample_factor,
      model.codebook_size,
      dict(mesh.shape),
      t.batch_size,
      start,
      t.steps,
      " (decoder finetuning)" if frozen else "",
    )
    finite, last_loss = jnp.asarray(True), float("nan")
    timer = common.StepTimer(start)
    progress = tqdm.tqdm(
      total=t.steps, initial=start, disable=jax.process_index() != 0, desc="train-vq", unit="step"
    )
    try:
      for step in range(start + 1, t.steps + 1):
        if first is not None:
          local, first = first, None
        else:
          local = next(data)
        _check_batch(local, config, model.downsample_factor, frozen)
        batch = common.global_batch({k: local[k] for k in ("image", "ids") if k in local}, mesh)
        use_gan = config.loss.adversarial_weight > 0 and step - 1 >= config.loss.disc_start
        kind = (use_gan, "ids" in batch)
        if kind not in steps:
          steps[kind] = compile_step(*kind)
        state, metrics = steps[kind](state, batch, lpips_params)
        finite = finite & jnp.isfinite(metrics["train/loss"])
        progress.update(1)
        out_of_time = time_limit.reached()
        must_save = ckpt.should_save(step) or step == t.steps or out_of_time
        if step % t.log_every == 0 or must_save or step == start + 1:
          values = common.fetch(metrics)
          last_loss = float(values["train/loss"])
          common.raise_unless_finite(finite, step, last_loss, ckpt)
          if step % t.log_every == 0:
            lap = timer.lap(step, tokens_per_step=t.batch_size, flops_per_step=0.0, peak_flops=None)
            values["perf/step_time_s"] = lap["perf/step_time_s"]
            values["perf/images_per_s"] = lap["perf/tokens_per_s"]
            writer.scalars(step, values)
            progress.set_postfix(loss=f"{last_loss:.4f}", psnr=f"{float(values['train/psnr']):.2f}")
        if (t.eval_every and step % t.eval_every == 0) or (
          t.image_every and step % t.image_every == 0
        ):
          _evaluate(step, state, eval_fn, eval_images, model, writer, t)
        if common.save_or_stop(
          ckpt, step, state, lambda: {"data": _data_states(data)}, must_save=must_save,
          out_of_time=out_of_time, time_limit_s=t.time_limit_s,
        ):  # fmt: skip
          break
    finally:
      progress.close()
      ckpt.close()
      writer.close()
  logging.info("Finished at step %d, last loss %.5f.", int(common.fetch(state.step)), last_loss)
  return state


def _data_states(data: Any) -> Any:
  return common.gather_process_states(data.get_state()) if hasattr(data, "get_state") else None


def _check_batch(
  local: dict[str, np.ndarray], config: ml_collections.ConfigDict, f: int, frozen: bool
) -> None:
  img = np.asarray(local["image"]) if not hasattr(local["image"], "dtype") else local["image"]
  s = config.data.resolution
  if img.dtype != np.uint8 or img.ndim != 4 or tuple(img.shape[1:]) != (s, s, 3):
    raise ValueError(
      f"data gave images of shape {tuple(img.shape)} and dtype {img.dtype}; expected uint8 [b, {s}, {s}, 3]"
      " (data.resolution, data.output='uint8')"
    )
  if "ids" not in local:
    return
  ids = local["ids"]
  want = (img.shape[0], s // f, s // f)
  if not frozen or tuple(ids.shape) != want or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
      f"data gave ids of shape {tuple(ids.shape)} and dtype {ids.dtype}"
      f"{'' if frozen else ' without finetune.checkpoint'}; expected int {list(want)} "
      "(one code per token of each image) with decoder finetuning"
    )


def _evaluate(step, state, eval_fn, eval_images, model, writer, t) -> dict[str, float]:
  out = common.fetch(eval_fn(state.ema_params, jnp.asarray(eval_images)))
  ids = np.asarray(out["ids"])
  used = len(np.unique(ids)) / model.codebook_size
  values = {"eval/psnr_ema": float(np.mean(out["psnr"])), "eval/codebook_usage_ema": used}
  writer.scalars(step, values)
  if t.image_every and step % t.image_every == 0:
    lo, hi = model.input_range
    rec = np.clip(np.round((np.asarray(out["recon"]) - lo) / (hi - lo) * 255.0), 0, 255).astype(
      np.uint8
    )
    n = min(8, len(rec))
    pairs = [im for i in range(n) for im in (np.asarray(eval_images[i]), rec[i])]
    writer.images(step, {"reconstructions": images_lib.make_grid(pairs, columns=4)})
  return values
