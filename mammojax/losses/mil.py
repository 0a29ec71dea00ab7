"""Losses of the MIL models: weighted binary cross-entropy and the deep-supervision total."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Positive-class weights FPN-MIL takes from Mammo-CLIP for VinDr-Mammo (negatives / positives).
VINDR_MASS_POS_WEIGHT = 15.573306370070778
VINDR_CALCIFICATION_POS_WEIGHT = 37.296728971962615


def weighted_bce_with_logits(
  logits: jax.Array, labels: jax.Array, pos_weight: float | jax.Array | None = None
) -> jax.Array:
  """Mean binary cross-entropy on logits, the positive term scaled by ``pos_weight``.

  Matches torch's ``BCEWithLogitsLoss(pos_weight=...)``: ``-[w y log s(x) + (1 - y) log(1 -
  s(x))]`` averaged over elements (not normalised by the weights).

  Args:
    logits: [B] (any shape) raw scores.
    labels: same shape, targets in [0, 1].
    pos_weight: weight of positive examples; None for 1.

  Returns:
    Scalar float32 loss.
  """
  if logits.shape != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} must have the same shape.")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  weight = 1.0 if pos_weight is None else pos_weight
  return -jnp.mean(weight * labels * log_p + (1.0 - labels) * log_not_p)


def deep_supervision_loss(
  logits: jax.Array,
  scale_logits: jax.Array | None,
  labels: jax.Array,
  pos_weight: float | jax.Array | None = None,
  side_weight: float = 1.0,
) -> jax.Array:
  """FPN-MIL's total loss: BCE of the aggregated logits plus ``side_weight`` x each scale's BCE.

  The reference adds every side loss with weight 1 (``side_weight=1``).

  Args:
    logits: [B] aggregated bag logits.
    scale_logits: [B, S] per-scale side logits, or None without deep supervision.
    labels: [B] binary targets.
    pos_weight: positive-class weight shared by all terms.
    side_weight: weight of each side loss.

  Returns:
    Scalar float32 loss.
  """
  total = weighted_bce_with_logits(logits, labels, pos_weight)
  if scale_logits is None:
    return total
  if scale_logits.ndim != 2 or scale_logits.shape[0] != labels.shape[0]:
    raise ValueError(
      f"scale_logits must be [B, S] with B = {labels.shape[0]}, got {scale_logits.shape}."
    )
  for s in range(scale_logits.shape[1]):
    total = total + side_weight * weighted_bce_with_logits(scale_logits[:, s], labels, pos_weight)
  return total
