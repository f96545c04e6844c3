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
