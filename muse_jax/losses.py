"""Training losses: the VQGAN tokenizer's losses and the transformers' masked cross-entropy.

VQGAN (paper §2.2, §2.5): reconstruction, perceptual, adversarial (StyleGAN
discriminator), R1 gradient penalty, LeCAM regularisation and the quantizer's
commitment loss (written by the VQ trainer's author, below).

Masked transformers (paper §2.3, §2.4): cross-entropy between the predicted logits
and the ground-truth token ids, averaged over the masked positions only; unmasked
positions are given to the model and carry no loss. Optional label smoothing spreads
``label_smoothing`` of the target mass uniformly over the K codes.

All losses are pure functions of arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(
  logits: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  *,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and accuracy over masked positions only.

  Args:
    logits: float [B, L, K].
    targets: int [B, L] ground-truth ids in [0, K).
    mask: bool [B, L], True where the input token was masked (these carry the loss).
    label_smoothing: in [0, 1); the target puts ``1 - label_smoothing`` on the true
      id and spreads the rest evenly over all K ids.

  Returns:
    ``(loss, accuracy)``: float32 scalars, the mean over masked positions of the
    cross-entropy and of (argmax == target). Zero when nothing is masked.
  """
  if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
    raise ValueError(
      f"logits [B, L, K], targets [B, L] and mask [B, L] disagree: {logits.shape}, "
      f"{targets.shape}, {mask.shape}"
    )
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if label_smoothing:
    labels = optax.smooth_labels(jax.nn.one_hot(targets, num_classes), label_smoothing)
    per_token = optax.softmax_cross_entropy(logits, labels)  # [B, L]
  else:
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(per_token * weights) / count
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * weights) / count
  return loss, accuracy


# ---------------------------------------------------------------------------
# VQGAN losses (paper §2.2, App. A.2; the generator side also adds the quantizer's
# codebook + β·commitment loss from ``models/quantizer.py``).
#
# generator:     w_rec·rec + w_perc·perceptual + w_adv·g_adv + quantizer
# discriminator: d_adv + (γ/2)·R1 + w_lecam·LeCAM
#
# Adversarial losses take the discriminator's logits; the hinge form (Lim & Ye 2017)
# and the non-saturating form (Goodfellow et al. 2014, StyleGAN) are offered. R1
# (Mescheder et al. 2018) penalises the gradient norm of D on real images. LeCAM
# (Tseng et al. 2021) pulls D's outputs towards running averages of the other side's.


def reconstruction_loss(x: jax.Array, x_hat: jax.Array, kind: str = "l1") -> jax.Array:
  """Mean absolute ("l1") or squared ("l2") pixel error, float32 scalar."""
  d = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == "l1":
    return jnp.mean(jnp.abs(d))
  if kind == "l2":
    return jnp.mean(jnp.square(d))
  raise ValueError(f"reconstruction loss must be 'l1' or 'l2'; got {kind!r}")


def generator_adversarial_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
  """Generator side: hinge ``-E[D(G)]``, non-saturating ``E[softplus(-D(G))]``."""
  fake = fake_logits.astype(jnp.float32)
  if kind == "hinge":
    return -jnp.mean(fake)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-fake))
  raise ValueError(f"adversarial loss must be 'hinge' or 'non_saturating'; got {kind!r}")


def discriminator_adversarial_loss(
  real_logits: jax.Array, fake_logits: jax.Array, kind: str = "hinge"
) -> jax.Array:
  """Discriminator side: hinge ``E[relu(1-D(x))] + E[relu(1+D(G))]``, or the
  non-saturating ``E[softplus(-D(x))] + E[softplus(D(G))]``."""
  real, fake = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
  raise ValueError(f"adversarial loss must be 'hinge' or 'non_saturating'; got {kind!r}")


def r1_penalty(d_fn, real: jax.Array) -> jax.Array:
  """``E_x ||∇_x D(x)||²`` over real images (multiply by γ/2).

  Args:
    d_fn: images [B, H, W, C] -> logits [B] or [B, 1] (params closed over).
    real: the real images.
  """
  grads = jax.grad(lambda x: jnp.sum(d_fn(x).astype(jnp.float32)))(real.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))


def lecam_loss(
  real_logits: jax.Array, fake_logits: jax.Array, ema_real: jax.Array, ema_fake: jax.Array
) -> jax.Array:
  """LeCAM: ``E[relu(D(x) - ema_fake)²] + E[relu(ema_real - D(G))²]``."""
  real, fake = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  return jnp.mean(jnp.square(jax.nn.relu(real - ema_fake))) + jnp.mean(
    jnp.square(jax.nn.relu(ema_real - fake))
  )


def lecam_update(
  ema: dict[str, jax.Array], real_logits: jax.Array, fake_logits: jax.Array, decay: float = 0.999
) -> dict[str, jax.Array]:
  """Running means of D's outputs on real and fake images, for ``lecam_loss``."""
  return {
    "real": decay * ema["real"] + (1 - decay) * jnp.mean(real_logits.astype(jnp.float32)),
    "fake": decay * ema["fake"] + (1 - decay) * jnp.mean(fake_logits.astype(jnp.float32)),
  }


def psnr(x: jax.Array, x_hat: jax.Array, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image [B] (images in a range of width ``data_range``)."""
  d = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
  mse = jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10))
