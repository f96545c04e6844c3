"""The VQGAN train step: generator and discriminator updates, EMA, codebook upkeep.

One call of the step (all inside one ``jax.jit``):

1. generator loss (paper App. A.2):
   ``w_rec·|x - x̂| + w_perc·LPIPS(x, x̂) + w_adv·g_adv(D(x̂)) + w_q·(codebook + β·commitment)``
   (the adversarial term only once ``step >= disc_start``);
2. discriminator loss (same condition): ``d_adv(D(x), D(sg[x̂])) + (γ/2)·R1 + w_lecam·LeCAM``,
   R1 applied lazily every ``r1_every`` steps with γ scaled by that interval (StyleGAN2 §B);
3. Adam updates of both, an EMA of the generator's parameters;
4. codebook upkeep: a running mean of per-code hits; every ``restart_every`` steps, codes
   hit less than ``dead_fraction`` of the uniform rate are re-seeded with encoder outputs
   of the batch (Jukebox-style restarts; keeps codebook usage high).

Decoder finetuning (paper §2.5): the encoder, quant_conv and codebook are frozen
(``frozen_encoder``): their outputs are behind ``stop_gradient`` and their optimizer
transform is ``set_to_zero``; codebook upkeep is off. With ``code_neighbours`` given
(``finetune.code_noise`` > 0), each token the decoder sees is, with that probability,
swapped for one of its codebook neighbours while the target stays the clean image: a
transformer's sampled tokens are never exactly an encoder's, and a decoder trained this
way renders what a slightly wrong token grid was meant to show. A batch may also bring its
own ``ids`` for the decoder, such as the image's tokens re-predicted by the transformer
itself, whose errors are the ones the decoder will meet.

Two variants of the step are compiled, without and with the GAN terms; the loop picks
one by the step number, so the pre-GAN phase pays nothing for the discriminator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from muse_jax import losses
from muse_jax.models import quantizer as quantizer_lib
from muse_jax.models.discriminator import StyleGANDiscriminator
from muse_jax.models.perceptual import LPIPS
from muse_jax.models.vqgan import VQGAN

FROZEN_WHEN_FINETUNING = ("encoder", "quant_conv", "quantize")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimizer steps taken.
  params: Any  # generator (VQGAN) params, float32.
  ema_params: Any  # EMA of params; what load_tokenizer returns.
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  lecam: Any  # {"real", "fake"}: float32 [] running means of D's logits.
  code_usage: jax.Array  # float32 [K]: running mean of per-step code hits.


def frozen_labels(params: Any, frozen: bool) -> Any:
  """'frozen' / 'train' per leaf, for ``optax.multi_transform``."""
  return {
    k: jax.tree.map(
      lambda _, k=k: "frozen" if frozen and k in FROZEN_WHEN_FINETUNING else "train", v
    )
    for k, v in params.items()
  }


def with_frozen(
  tx: optax.GradientTransformation, params: Any, frozen: bool
) -> optax.GradientTransformation:
  if not frozen:
    return tx
  return optax.multi_transform(
    {"train": tx, "frozen": optax.set_to_zero()}, frozen_labels(params, True)
  )


def to_lpips_range(x: jax.Array, input_range: tuple[float, float]) -> jax.Array:
  lo, hi = input_range
  return (x - lo) * (2.0 / (hi - lo)) - 1.0


def make_train_step(
  config: Any,
  model: VQGAN,
  disc: StyleGANDiscriminator,
  lpips: LPIPS | None,
  tx: optax.GradientTransformation,
  disc_tx: optax.GradientTransformation,
  schedule: Callable[[jax.Array], jax.Array],
  *,
  use_gan: bool,
  frozen_encoder: bool,
  code_neighbours: jax.Array | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, batch, lpips_params) -> (state, metrics)``; ``batch["image"]`` uint8 [B,H,W,3].

  Decoder finetuning only: ``batch["ids"]`` (int [B, h, w], optional) are the codes the
  decoder sees instead of the encoder's, e.g. a transformer's predictions of the image's
  tokens (the encoder is then not run, and the code metrics are of these ids);
  ``code_neighbours`` (int32 [K, k], ``quantizer.nearest_codes`` of the frozen codebook)
  turns on code noise at rate ``config.finetune.code_noise``.
  """
  L, cb_cfg, t = config.loss, config.codebook, config.train
  lo, hi = model.input_range
  base_rng = jax.random.key(t.seed)
  perc_w = L.perceptual_weight if lpips is not None else 0.0
  if code_neighbours is not None and not frozen_encoder:
    raise ValueError("code noise needs a frozen codebook (decoder finetuning)")

  def forward(params, x, rng, given_ids):
    v = {"params": params}
    if not frozen_encoder:
      if given_ids is not None:
        raise ValueError("batches with 'ids' need decoder finetuning (finetune.checkpoint)")
      return model.apply(v, x)
    if given_ids is None:
      z = jax.lax.stop_gradient(model.apply(v, x, method=model.encode_latents))
      z_q, ids, aux = model.apply(v, z, method=model.quantize_latents)
      aux = {**aux, "ids": ids, "z": z}
      if code_neighbours is None:
        return model.apply(v, z_q, method=model.decode_codes), aux
      seen = ids
    else:
      # The frozen encoder would only feed metrics here, so it is not run (15% of the
      # demo decoder's step). The code statistics describe the codes the decoder sees;
      # the quantizer losses, with nothing trainable in them, are zero.
      zero = jnp.zeros([], jnp.float32)
      aux = {"ids": given_ids, "quantizer_loss": zero, "commitment_loss": zero,
             **quantizer_lib.code_stats(given_ids, model.codebook_size)}  # fmt: skip
      seen = given_ids
    if code_neighbours is not None:
      seen = quantizer_lib.perturb_ids(rng, seen, code_neighbours, config.finetune.code_noise)
    return model.apply(v, seen, method=model.decode), aux

  def gen_loss(params, disc_params, lpips_params, x, rng, given_ids):
    x_hat, aux = forward(params, x, rng, given_ids)
    rec = losses.reconstruction_loss(x, x_hat, L.reconstruction)
    total = L.reconstruction_weight * rec + L.quantizer_weight * aux["quantizer_loss"]
    m = {
      "rec_loss": rec,
      "quantizer_loss": aux["quantizer_loss"],
      "commitment_loss": aux["commitment_loss"],
    }
    if perc_w:
      perc = jnp.mean(
        lpips.apply(
          {"params": lpips_params}, to_lpips_range(x, (lo, hi)), to_lpips_range(x_hat, (lo, hi))
        )
      )
      total = total + perc_w * perc
      m["perceptual_loss"] = perc
    if use_gan:
      g_adv = losses.generator_adversarial_loss(
        disc.apply({"params": disc_params}, x_hat), L.adversarial
      )
      total = total + L.adversarial_weight * g_adv
      m["g_adv_loss"] = g_adv
    m["loss"] = total
    return total, (x_hat, aux, m)

  def disc_loss(disc_params, x, x_hat, lecam, do_r1):
    d = lambda z: disc.apply({"params": disc_params}, z)
    real, fake = d(x), d(jax.lax.stop_gradient(x_hat))
    adv = losses.discriminator_adversarial_loss(real, fake, L.adversarial)
    total = adv
    m = {"d_adv_loss": adv, "logits_real": jnp.mean(real), "logits_fake": jnp.mean(fake)}
    if L.lecam_weight:
      lc = losses.lecam_loss(real, fake, lecam["real"], lecam["fake"])
      total = total + L.lecam_weight * lc
      m["lecam_loss"] = lc
    if L.r1_gamma:
      r1 = jax.lax.cond(do_r1, lambda: losses.r1_penalty(d, x), lambda: jnp.zeros([], jnp.float32))
      total = total + 0.5 * L.r1_gamma * L.r1_every * r1
      m["r1"] = r1
    m["d_loss"] = total
    return total, (real, fake, m)

  def step_fn(state: TrainState, batch: dict[str, jax.Array], lpips_params: Any):
    x = batch["image"].astype(jnp.float32) * ((hi - lo) / 255.0) + lo
    rng = jax.random.fold_in(base_rng, state.step)
    (_, (x_hat, aux, m)), grads = jax.value_and_grad(gen_loss, has_aux=True)(
      state.params, state.disc_params, lpips_params, x, jax.random.fold_in(rng, 1), batch.get("ids")
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"train/{k}": v for k, v in m.items()}
    metrics["train/lr"] = schedule(state.step)
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["train/psnr"] = jnp.mean(losses.psnr(x, jnp.clip(x_hat, lo, hi), data_range=hi - lo))
    metrics["codebook/batch_usage"] = aux["codebook_usage"]
    metrics["codebook/perplexity"] = aux["perplexity"]

    disc_params, disc_opt_state, lecam = state.disc_params, state.disc_opt_state, state.lecam
    if use_gan:
      do_r1 = state.step % max(L.r1_every, 1) == 0
      (_, (real, fake, dm)), dgrads = jax.value_and_grad(disc_loss, has_aux=True)(
        disc_params, x, x_hat, lecam, do_r1
      )
      dupd, disc_opt_state = disc_tx.update(dgrads, disc_opt_state, disc_params)
      disc_params = optax.apply_updates(disc_params, dupd)
      lecam = losses.lecam_update(lecam, real, fake, L.lecam_decay)
      metrics.update({f"train/{k}": v for k, v in dm.items()})
      metrics["train/disc_grad_norm"] = optax.tree.norm(dgrads)

    # Codebook upkeep.
    # code_usage is a zero-initialised EMA of per-step hits; divided by 1 - decay^n it is
    # unbiased from the first step (Adam's correction), so early restarts are not spurious.
    decay = cb_cfg.usage_decay
    usage = decay * state.code_usage + (1.0 - decay) * aux["code_counts"]
    unbiased = usage / (1.0 - decay ** (state.step + 1).astype(jnp.float32))
    k = usage.shape[0]
    tokens = aux["ids"].size
    threshold = cb_cfg.dead_fraction * tokens / k
    if cb_cfg.restart_every and not frozen_encoder:
      do = (state.step + 1) % cb_cfg.restart_every == 0
      z = aux["z"].reshape(-1, aux["z"].shape[-1]).astype(jnp.float32)
      cb = params["quantize"]["embedding"]
      new_cb, n_dead = quantizer_lib.restart_dead_codes(
        cb, unbiased, z, rng, threshold, cb_cfg.restart_noise
      )
      dead = unbiased < threshold
      params = {
        **params,
        "quantize": {**params["quantize"], "embedding": jnp.where(do, new_cb, cb)},
      }
      # A restarted code gets the uniform rate, so it has time to attract latents.
      fresh = (1.0 - decay ** (state.step + 1).astype(jnp.float32)) * tokens / k
      usage = jnp.where(do & dead, fresh, usage)
      unbiased = jnp.where(do & dead, tokens / k, unbiased)
      metrics["codebook/restarted"] = jnp.where(do, n_dead, 0).astype(jnp.float32)
    metrics["codebook/usage"] = jnp.mean((unbiased >= threshold).astype(jnp.float32))

    ema_decay = jnp.minimum(t.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      ema_params=ema,
      opt_state=opt_state,
      disc_params=disc_params,
      disc_opt_state=disc_opt_state,
      lecam=lecam,
      code_usage=usage,
    )
    return new_state, metrics

  return step_fn


def make_eval_fn(model: VQGAN) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """``(params, images uint8) -> {"recon": float [B,H,W,C] in range, "psnr": [B], "ids"}``."""
  lo, hi = model.input_range

  def eval_fn(params, images):
    x = images.astype(jnp.float32) * ((hi - lo) / 255.0) + lo
    x_hat, aux = model.apply({"params": params}, x)
    x_hat = jnp.clip(x_hat, lo, hi)
    return {"recon": x_hat, "psnr": losses.psnr(x, x_hat, data_range=hi - lo), "ids": aux["ids"]}

  return eval_fn


def kmeans_codebook(
  model: VQGAN, params: Any, images: jax.Array, rng: jax.Array, iters: int = 10
) -> Any:
  """Params with the codebook replaced by k-means centroids of the batch's latents."""
  lo, hi = model.input_range
  x = images.astype(jnp.float32) * ((hi - lo) / 255.0) + lo
  z = model.apply({"params": params}, x, method=model.encode_latents)
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  if model.l2_normalize:
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
  cb = quantizer_lib.kmeans_init(z, model.codebook_size, rng, iters)
  return {**params, "quantize": {**params["quantize"], "embedding": cb}}
