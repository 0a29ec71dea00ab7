"""Binary cross-entropy on logits, masked and optionally pos-weighted: the one formula the risk and
MIL losses share.

Per element ``-[w y log s(x) + (1 - y) log(1 - s(x))]`` (torch's ``BCEWithLogitsLoss``), reduced
over the observed elements: ``sum(mask * loss) / sum(mask)``, 0 when nothing is observed, or the
plain mean without a mask. ``log(1 - s(x))`` is computed as ``log_sigmoid(-x)``, stable for large
logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_bce_with_logits(
  logits: jax.Array,
  labels: jax.Array,
  pos_weight: float | jax.Array | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Mean binary cross-entropy over the observed elements, the positive term scaled.

  Matches torch's ``BCEWithLogitsLoss(pos_weight=...)`` without a mask (averaged over elements,
  not normalised by the weights).

  Args:
    logits: [...] raw scores (e.g. [B] bag logits or [B, Y] yearly risk logits).
    labels: same shape, targets in [0, 1].
    pos_weight: weight of the positive term; None for 1.
    mask: same shape, 1 (or a weight) where the element counts, 0 where it is censored or
      padding; None counts every element.

  Returns:
    Scalar float32 loss; 0 when the mask is all zero (with a zero gradient).
  """
  if logits.shape != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} must have the same shape.")
  if mask is not None and mask.shape != logits.shape:
    raise ValueError(f"mask {mask.shape} must have the shape of the logits {logits.shape}.")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  positive = labels if pos_weight is None else pos_weight * labels
  per = -(positive * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  if mask is None:
    return jnp.mean(per)
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask)
  # The max keeps the unselected branch finite, so an empty mask has a zero (not NaN) gradient.
  return jnp.where(count > 0, jnp.sum(per * mask) / jnp.maximum(count, 1.0), 0.0)
