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

For the end-to-end model (:class:`~mammojax.models.sequence_classifier.SequenceClassifier`,
backbone inside the graph), :func:`sequence_parts` splits it into per-visit features and the
temporal model (for the two methods above), and :func:`visit_image_adapter` lets every image
method (GradCAM, guided backpropagation, guided GradCAM, integrated gradients) map each visit's
image for the sequence's prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.interpret.adapter import (
  ModelAdapter,
  backbone_adapter_options,
  hashable_fields,
  module_adapter,
  target_logits,
  targets,
)
from mammojax.interpret.integrated import quadrature
from mammojax.models.sequence_classifier import (
  ImageEncoder,
  SequenceClassifier,
  temporal_module,
)

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


# ----------------------------------------------------------------------------- end-to-end models


class VisitImages(nn.Module):
  """A :class:`~mammojax.models.sequence_classifier.SequenceClassifier` seen by the image
  methods: the visits of sequences as rows of one image batch.

  ``images [N * L, H, W, 1]`` (``N`` sequences of ``L`` visits, visit-major within each) ->
  ``[N * L, K]``: every row of a sequence carries ``1 / L`` of that sequence's logits, so the
  sum over a sequence's rows (what the methods differentiate) is its logit, and each row's
  gradient is the gradient of the *sequence's* prediction with respect to that visit's image.
  The mask and time offsets ``[L]`` come from the ``context`` collection (data, not weights, so
  new sequences do not recompile). Rows of one call must be whole sequences: true of GradCAM,
  guided backpropagation and integrated gradients (every visit of a sequence is at the same
  interpolation point); gradient SHAP would draw its interpolation point per visit, so it is
  not offered over visits.
  """

  backbone: Mapping[str, Any]
  temporal: Mapping[str, Any]
  num_classes: int
  backbone_activation: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    mask = self.get_variable("context", "sequence_mask")  # [L]
    offsets = self.get_variable("context", "time_offsets")  # [L]
    length = mask.shape[0]
    if images.shape[0] % length:
      raise ValueError(f"{images.shape[0]} images are not whole sequences of {length} visits")
    count = images.shape[0] // length
    classifier = SequenceClassifier(
      backbone=self.backbone,
      temporal=self.temporal,
      num_classes=self.num_classes,
      backbone_activation=self.backbone_activation,
      name="classifier",
    )
    logits = classifier(
      images.reshape(count, length, *images.shape[1:]),
      jnp.broadcast_to(mask, (count, length)),
      jnp.broadcast_to(offsets, (count, length)),
      train=train,
    )
    return jnp.repeat(logits / length, length, axis=0)


def visit_image_adapter(
  model: SequenceClassifier,
  variables: Mapping[str, Any],
  mask: Any,
  time_offsets: Any,
) -> ModelAdapter:
  """An adapter over the visit images of one sequence (:class:`VisitImages`).

  Args:
    model: the trained sequence classifier.
    variables: its variables (``params``, ``batch_stats``).
    mask: ``[L]``, 1 = a real visit.
    time_offsets: ``[L]`` years before the current visit.
  Returns:
    A :class:`ModelAdapter` whose images are the sequence's ``[L, H, W, 1]`` (padded visits
    included: their maps are zero, as the model zeroes their features); layers as the
    backbone's (``layer4``, ``encoder_layer_2_out``, ...).
  """
  options = backbone_adapter_options(model.backbone)
  rectify = "activation_field" in options
  module = VisitImages(
    backbone=hashable_fields(model.backbone),
    temporal=hashable_fields(model.temporal),
    num_classes=model.num_classes,
    backbone_activation=jax.nn.relu if rectify else None,
  )
  nested = {
    collection: {"classifier": tree}
    for collection, tree in variables.items()
    if collection in ("params", "batch_stats")
  }
  nested["context"] = {
    "sequence_mask": jnp.asarray(mask, jnp.float32),
    "time_offsets": jnp.asarray(time_offsets, jnp.float32),
  }
  return module_adapter(module, nested, apply_kwargs={"train": False}, **options)


def sequence_parts(
  model: SequenceClassifier, variables: Mapping[str, Any]
) -> tuple[Callable[[jax.Array, jax.Array], jax.Array], ApplyFn]:
  """The two halves of a sequence classifier, for attribution over the visits.

  Returns:
    ``features(images [B, L, H, W, 1], mask [B, L]) -> [B, L, D]`` (the backbone's pooled
    features, zero at padding, as inside the model) and ``apply_fn(features, mask,
    time_offsets) -> logits [B, K]`` (the temporal model), whose composition is the model.
  """
  encoder = ImageEncoder(model.backbone)
  temporal = temporal_module(model.temporal, model.num_classes)
  encoder_variables = {
    c: {"backbone": t["backbone"]} for c, t in variables.items() if "backbone" in t
  }
  temporal_variables = {c: t["temporal"] for c, t in variables.items() if "temporal" in t}

  def features(images: jax.Array, mask: jax.Array) -> jax.Array:
    batch, length = images.shape[:2]
    flat = encoder.apply(encoder_variables, images.reshape(batch * length, *images.shape[2:]))
    return flat.reshape(batch, length, -1) * jnp.asarray(mask, flat.dtype)[..., None]

  def apply_fn(feats: jax.Array, mask: jax.Array, time_offsets: jax.Array) -> jax.Array:
    return temporal.apply(temporal_variables, feats, mask, time_offsets, train=False)

  return features, apply_fn
