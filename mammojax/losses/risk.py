"""Masked binary cross-entropy over cumulative risk heads (BCRBench's default risk loss).

Per head: ``sum(mask * BCE(logits, target)) / sum(mask)`` over the whole batch and all years
(0 when nothing is observed), then a weighted sum over heads. BCRBench's weights are fused 1.0,
cur 0.2, pri 0.2 (and 1.0 for any head it does not list).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mammojax.losses.bce import weighted_bce_with_logits

# head name -> (logits [B, Y], target [B, Y], mask [B, Y]): what ``RiskModel.risk_heads`` returns.
RiskHeads = dict[str, tuple[jax.Array, jax.Array, jax.Array]]

DEFAULT_HEAD_WEIGHTS: Mapping[str, float] = {"fused": 1.0, "cur": 0.2, "pri": 0.2}


def masked_bce_with_logits(logits: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean BCE over observed entries; all arguments ``[B, Y]``, returns a scalar (0 if none)."""
  if logits.shape != target.shape or logits.shape != mask.shape:
    raise ValueError(
      f"logits {logits.shape}, target {target.shape} and mask {mask.shape} must "
      "have one shape [B, num_years]"
    )
  return weighted_bce_with_logits(logits, target, mask=mask)


def risk_loss(
  heads: RiskHeads, head_weights: Mapping[str, float] | None = None, valid: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of :func:`masked_bce_with_logits` over heads.

  Args:
    heads: ``{name: (logits, target, mask)}`` from ``RiskModel.risk_heads``.
    head_weights: per-head weights; heads not listed weigh 1.0. Default
      :data:`DEFAULT_HEAD_WEIGHTS`.
    valid: optional ``[B]`` 0/1 marking real (1) versus padding (0) examples; padding is
      removed from every mask.
  Returns:
    ``(total, {name: unweighted head loss})``.
  """
  weights = DEFAULT_HEAD_WEIGHTS if head_weights is None else head_weights
  total = jnp.zeros((), jnp.float32)
  per_head = {}
  for name, (logits, target, mask) in heads.items():
    if valid is not None:
      mask = mask * jnp.asarray(valid, mask.dtype)[:, None]
    per_head[name] = masked_bce_with_logits(logits, target, mask)
    total = total + weights.get(name, 1.0) * per_head[name]
  return total, per_head
