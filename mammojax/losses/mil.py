"""Losses of the MIL models: FPN-MIL's deep supervision (bag BCE plus one BCE per scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mammojax.losses.bce import weighted_bce_with_logits

# Positive-class weights FPN-MIL takes from Mammo-CLIP for VinDr-Mammo (negatives / positives).
VINDR_MASS_POS_WEIGHT = 15.573306370070778
VINDR_CALCIFICATION_POS_WEIGHT = 37.296728971962615


def masked_deep_supervision_loss(
  logits: jax.Array,
  scale_logits: jax.Array | None,
  labels: jax.Array,
  valid: jax.Array | None,
  pos_weight: float | jax.Array | None,
  side_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FPN-MIL's total loss over the valid examples: BCE of the aggregated logits plus
  ``side_weight`` x the sum of each scale's BCE.

  Args:
    logits: [B] aggregated bag logits.
    scale_logits: [B, S] per-scale side logits, or None without deep supervision.
    labels: [B] binary targets.
    valid: [B] 1 for real examples, 0 for padding; None when all are real.
    pos_weight: positive-class weight shared by all terms; None for 1.
    side_weight: weight of each side loss (the reference adds each with weight 1).

  Returns:
    ``(total, {'loss_bag': bag BCE, 'loss_sides': sum of the side BCEs})``, scalars float32.
  """
  bag = weighted_bce_with_logits(logits, labels, pos_weight, valid)
  if scale_logits is None:
    sides = jnp.zeros(())
  else:
    if scale_logits.ndim != 2 or scale_logits.shape[0] != labels.shape[0]:
      raise ValueError(
        f"scale_logits must be [B, S] with B = {labels.shape[0]}, got {scale_logits.shape}."
      )
    sides = sum(
      (
        weighted_bce_with_logits(scale_logits[:, s], labels, pos_weight, valid)
        for s in range(scale_logits.shape[1])
      ),
      jnp.zeros(()),
    )
  return bag + side_weight * sides, {"loss_bag": bag, "loss_sides": sides}


def deep_supervision_loss(
  logits: jax.Array,
  scale_logits: jax.Array | None,
  labels: jax.Array,
  pos_weight: float | jax.Array | None = None,
  side_weight: float = 1.0,
) -> jax.Array:
  """:func:`masked_deep_supervision_loss` of a batch without padding: the scalar total."""
  return masked_deep_supervision_loss(logits, scale_logits, labels, None, pos_weight, side_weight)[
    0
  ]
