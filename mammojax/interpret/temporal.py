"""Attribution over time for the temporal models (:mod:`mammojax.models.temporal`): which earlier
visits a prediction rests on.

Both methods take a pure function ``apply_fn(features [B, L, D], mask [B, L], time_offsets
[B, L]) -> logits [B, K]`` (e.g. ``functools.partial(model.apply, variables, train=False)``),
are traceable (wrap them in ``jax.jit`` with ``apply_fn`` closed over), and give every example
its own attribution for its own ``target`` class (``[B]`` ints or one int):

* :func:`visit_integrated_gradients`: integrated gradients (Sundararajan et al. 2017) of the
  target logit with respect to the per-visit features, the mask and the time offsets held
  fixed, with the quadrature of :func:`mammojax.interpret.integrated.quadrature`; summed over the
  feature axis to one importance per visit, with the convergence delta.
* :func:`visit_occlusion`: the drop in the target probability when one real visit is removed
  (mask 0, features zeroed), every visit at once under ``vmap``.

Padded positions (mask 0) always get exactly 0. Rows of the batch must not interact (the models
do not in eval mode; the DNN's BatchNorm then uses its running statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mammojax.interpret.adapter import target_logits, targets
from mammojax.interpret.integrated import quadrature

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class VisitAttribution(NamedTuple):
  """Integrated gradients over the visits of each sequence.

  Attributes:
    per_visit: ``[B, L]``, ``per_feature`` summed over the features; 0 at padding.
    per_feature: ``[B, L, D]``, ``(x - baseline) * integrated gradient``; 0 at padding.
    delta: ``[B]``, ``sum(per_visit) - (f(x) - f(baseline))`` of the target logit
      (completeness: near 0 when the quadrature is accurate).
  """

  per_visit: jax.Array
  per_feature: jax.Array
  delta: jax.Array


def _as_features(features: jax.Array) -> jax.Array:
  features = jnp.asarray(features)
  if not jnp.issubdtype(features.dtype, jnp.floating):
    features = features.astype(jnp.float32)
  if features.ndim != 3:
    raise ValueError(f"features must be [B, L, D], got shape {features.shape}")
  return features


def visit_integrated_gradients(
  apply_fn: ApplyFn,
  features: jax.Array,
  mask: jax.Array,
  time_offsets: jax.Array,
  target: int | jax.Array,
  *,
  baseline: float | jax.Array | None = None,
  n_steps: int = 50,
  method: str = "gausslegendre",
) -> VisitAttribution:
  """Integrated gradients of the target logit with respect to each visit's features.

  ``per_feature = (x - b) * sum_k w_k * grad f(b + alpha_k (x - b))`` over the quadrature
  ``(alpha_k, w_k)`` of :func:`~mammojax.interpret.integrated.quadrature`; ``mask`` and
  ``time_offsets`` are the same at every point. The baseline is replaced by the features at
  padded positions, so the path never moves them (they are zeros and do not count), and their
  attributions are set to exactly 0. All ``n_steps * B`` points go through ``apply_fn`` in one
  batch.

  Args:
    apply_fn: ``(features [N, L, D], mask [N, L], time_offsets [N, L]) -> logits [N, K]``, rows
      independent.
    features: ``[B, L, D]``, zeros at padding.
    mask: ``[B, L]`` bool or int, 1 = real visit.
    time_offsets: ``[B, L]`` float years.
    target: the class of each example, ``[B]`` ints or one int.
    baseline: None (zeros), a number, or an array broadcastable to ``[B, L, D]``.
    n_steps: integration points.
    method: a quadrature rule of :data:`mammojax.interpret.integrated.METHODS`.
  Returns:
    :class:`VisitAttribution` (per_visit ``[B, L]``, per_feature ``[B, L, D]``, delta ``[B]``).
  """
  features = _as_features(features)
  batch, length, dim = features.shape
  target = targets(target, batch)
  valid = jnp.asarray(mask).astype(bool)
  if baseline is None:
    baseline = jnp.zeros_like(features)
  baseline = jnp.broadcast_to(jnp.asarray(baseline, features.dtype), features.shape)
  baseline = jnp.where(valid[..., None], baseline, features)
  difference = features - baseline
  alphas, weights = quadrature(method, n_steps)
  alphas = jnp.asarray(alphas, features.dtype)
  weights = jnp.asarray(weights, features.dtype)

  tiled_mask = jnp.tile(jnp.asarray(mask), (n_steps, 1))
  tiled_offsets = jnp.tile(jnp.asarray(time_offsets), (n_steps, 1))
  tiled_target = jnp.tile(target, n_steps)

  def summed_logit(points: jax.Array) -> jax.Array:  # [S * B, L, D] -> scalar
    return jnp.sum(target_logits(apply_fn(points, tiled_mask, tiled_offsets), tiled_target))

  points = baseline[None] + alphas[:, None, None, None] * difference[None]  # [S, B, L, D]
  gradients = jax.grad(summed_logit)(points.reshape(n_steps * batch, length, dim))
  gradients = gradients.reshape(n_steps, batch, length, dim)
  integrated = jnp.tensordot(weights, gradients, axes=1)  # [B, L, D]
  per_feature = jnp.where(valid[..., None], integrated * difference, 0)
  per_visit = jnp.sum(per_feature, axis=-1)

  ends = jnp.concatenate([features, baseline])
  end_logits = target_logits(
    apply_fn(
      ends, jnp.tile(jnp.asarray(mask), (2, 1)), jnp.tile(jnp.asarray(time_offsets), (2, 1))
    ),
    jnp.tile(target, 2),
  )
  delta = jnp.sum(per_visit, axis=1) - (end_logits[:batch] - end_logits[batch:])
  return VisitAttribution(per_visit, per_feature, delta)


def visit_occlusion(
  apply_fn: ApplyFn,
  features: jax.Array,
  mask: jax.Array,
  time_offsets: jax.Array,
  target: int | jax.Array,
) -> jax.Array:
  """The drop in the target probability when one real visit is removed.

  ``out[b, l] = p(target | all visits) - p(target | visit l removed)``, the probability the
  softmax of the logits, where removing sets ``mask[b, l] = 0`` and ``features[b, l] = 0`` (for a
  model that ignores the mask, such as the DNN, zeroing the features is the removal). The ``L``
  removals and the unchanged input run as one ``vmap``-ed program of ``L + 1`` batched calls
  of ``apply_fn``. Removing the
  current (newest) visit makes the previous real one current. Padded positions get 0.

  Args:
    apply_fn: ``(features [B, L, D], mask [B, L], time_offsets [B, L]) -> logits [B, K]``.
    features: ``[B, L, D]``, zeros at padding.
    mask: ``[B, L]`` bool or int, 1 = real visit.
    time_offsets: ``[B, L]`` float years.
    target: the class of each example, ``[B]`` ints or one int.
  Returns:
    ``[B, L]`` float (positive: the visit supported the target class).
  """
  features = _as_features(features)
  batch, length, _ = features.shape
  target = targets(target, batch)
  mask = jnp.asarray(mask)
  valid = mask.astype(bool)
  time_offsets = jnp.asarray(time_offsets)

  def probability(feats: jax.Array, keep: jax.Array) -> jax.Array:  # -> [B]
    logits = apply_fn(feats, keep, time_offsets).astype(jnp.float32)
    return target_logits(jax.nn.softmax(logits, axis=-1), target)

  def removed(position: jax.Array) -> jax.Array:  # -> [B]; position L removes nothing
    drop = jnp.arange(length) == position  # [L]
    keep = jnp.where(drop[None], jnp.zeros_like(mask), mask)
    return probability(jnp.where(drop[None, :, None], 0, features), keep)

  # The unchanged input runs in the same program, so a visit the model ignores gives exactly 0.
  probabilities = jax.vmap(removed)(jnp.arange(length + 1))  # [L + 1, B]
  full, without = probabilities[length], probabilities[:length]
  return jnp.where(valid, full[:, None] - without.T, 0)
