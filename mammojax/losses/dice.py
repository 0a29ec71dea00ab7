"""Soft Dice / Jaccard loss and Dice + cross-entropy, channels-last and N-d, as MONAI defines them.

* :func:`dice_loss` is MONAI's ``monai.losses.DiceLoss``: per example and class (or per class
  with ``batch=True``), ``1 - (2 tp + smooth_nr) / (2 tp + fp + fn + smooth_dr)`` with
  ``tp = sum(p g)``, ``fp = sum(p) - tp``, ``fn = sum(g) - tp`` over the spatial axes (squares of
  ``p`` and ``g`` with ``squared_pred``), or ``1 - (2 tp + smooth_nr) / (2 (tp + fp + fn) +
  smooth_dr)`` with ``jaccard``; then MONAI's ``weight`` per class and the ``reduction``.
* :func:`dice_ce_loss` is MONAI's ``monai.losses.DiceCELoss``: ``lambda_dice * dice +
  lambda_ce * ce``, where ``ce`` is torch's ``CrossEntropyLoss`` on the raw logits when there are
  several channels (class indices for a label map, class probabilities for a one-hot / soft
  target) and ``BCEWithLogitsLoss`` with one channel, both averaged over every voxel.

MONAI is channels-first (``[B, K, *S]``); here predictions are ``[B, *S, K]``. An integer label
map ``[B, *S]`` (or ``[B, *S, 1]`` when ``K > 1``) is one-hot encoded to ``K`` classes, which is
MONAI's ``to_onehot_y=True``; a ``[B, *S, K]`` target is used as it is (``to_onehot_y=False``).
With a single channel a label map is the binary target itself, as MONAI keeps it when it ignores
``to_onehot_y`` for one channel. Not implemented: MONAI's ``other_act``, ``soft_label``,
``ignore_index`` and DiceCELoss's ``label_smoothing``.

Added here, not in MONAI: ``valid`` ``[B]``, a weight per example (0 for the padding examples
of a fixed-size batch) so that padded examples do not contribute to any term.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

Reduction = Literal["mean", "sum", "none"]


def _one_hot_target(target: jax.Array, num_classes: int, pred_shape: tuple[int, ...]) -> jax.Array:
  """The target as float ``[B, *S, K]``: label maps one-hot encoded, one-hot / soft kept."""
  if target.shape == pred_shape:
    return target.astype(jnp.float32)
  if target.shape == pred_shape[:-1] + (1,) and num_classes > 1:
    target = target[..., 0]
  if target.shape != pred_shape[:-1]:
    raise ValueError(
      f"target {target.shape} must be a label map {pred_shape[:-1]} (or with a trailing 1) or "
      f"one-hot / soft {pred_shape} for predictions {pred_shape} [B, *S, K]."
    )
  if jnp.issubdtype(target.dtype, jnp.floating) and num_classes > 1:
    raise ValueError(
      f"a label-map target {target.shape} must hold integer class indices, got {target.dtype}; "
      "cast it with .astype(jnp.int32) or pass a one-hot [B, *S, K] target."
    )
  if num_classes == 1:
    # MONAI ignores to_onehot_y for one channel: the label map is the binary target.
    return target[..., None].astype(jnp.float32)
  return jax.nn.one_hot(target, num_classes, dtype=jnp.float32)


def _valid_weights(valid: jax.Array | None, batch: int) -> jax.Array | None:
  if valid is None:
    return None
  valid = jnp.asarray(valid, jnp.float32)
  if valid.shape != (batch,):
    raise ValueError(f"valid must have shape [B] = ({batch},), got {valid.shape}.")
  return valid


def _class_weights(weight, num_classes: int) -> jax.Array | None:
  """MONAI's ``weight`` as ``[K']``; None when there is none or when there is one class."""
  if weight is None or num_classes == 1:
    return None
  weight = jnp.asarray(weight, jnp.float32)
  if weight.ndim == 0:
    weight = jnp.full((num_classes,), weight)
  if weight.shape != (num_classes,):
    raise ValueError(
      f"weight must be a scalar or have one entry per class ({num_classes}), got {weight.shape}; "
      "with include_background=False it must not include the background class 0."
    )
  return weight


def _prepare(
  pred: jax.Array,
  target: jax.Array,
  include_background: bool,
  sigmoid: bool,
  softmax: bool,
) -> tuple[jax.Array, jax.Array]:
  """Activated predictions and the one-hot target, background dropped when asked, ``[B, *S, K']``."""
  if sigmoid and softmax:
    raise ValueError("sigmoid=True and softmax=True are incompatible: choose one activation.")
  if pred.ndim < 3:
    raise ValueError(
      f"predictions must be [B, *S, K] with at least one spatial axis, got {pred.shape}."
    )
  num_classes = pred.shape[-1]
  pred = pred.astype(jnp.float32)
  if sigmoid:
    pred = jax.nn.sigmoid(pred)
  if softmax:
    if num_classes == 1:
      warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
    else:
      pred = jax.nn.softmax(pred, axis=-1)
  onehot = _one_hot_target(jnp.asarray(target), num_classes, pred.shape)
  if not include_background:
    if num_classes == 1:
      warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
    else:
      pred, onehot = pred[..., 1:], onehot[..., 1:]
  return pred, onehot


def dice_loss(
  pred: jax.Array,
  target: jax.Array,
  *,
  include_background: bool = True,
  sigmoid: bool = False,
  softmax: bool = False,
  squared_pred: bool = False,
  jaccard: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  batch: bool = False,
  reduction: Reduction = "mean",
  weight: float | Sequence[float] | jax.Array | None = None,
  valid: jax.Array | None = None,
) -> jax.Array:
  """MONAI's ``DiceLoss`` on channels-last arrays.

  Args:
    pred: ``[B, *S, K]`` logits (with ``sigmoid`` / ``softmax``) or probabilities.
    target: ``[B, *S]`` integer labels (one-hot encoded: MONAI's ``to_onehot_y=True``), or
      ``[B, *S, K]`` one-hot or soft targets.
    include_background: False drops class 0 (ignored, with MONAI's warning, when ``K == 1``).
    sigmoid / softmax: the activation applied to ``pred`` (softmax over the last axis; ignored
      with MONAI's warning when ``K == 1``).
    squared_pred: squares of ``pred`` and ``target`` in the denominator.
    jaccard: the soft Jaccard (IoU) loss instead of Dice.
    smooth_nr / smooth_dr: added to the numerator / denominator.
    batch: sum over the batch before dividing (one value per class).
    reduction: ``"mean"`` / ``"sum"`` over examples and classes, or ``"none"``.
    weight: MONAI's ``weight``: a scalar or ``[K']`` per class (``K' = K - 1`` without the
      background), ``>= 0``, multiplying each class's loss; ignored when ``K' == 1``.
    valid: ``[B]`` example weights, 0 for padded examples (not in MONAI): they are left out of
      the sums with ``batch=True``, and of the mean / sum otherwise.

  Returns:
    A scalar float32 for ``"mean"`` / ``"sum"``; for ``"none"``, ``[B, K']`` (``[K']`` with
    ``batch=True``), where MONAI returns ``[B, K', 1, ...]`` (``[K', 1, ...]``), with padded
    examples' rows set to 0.
  """
  if reduction not in ("mean", "sum", "none"):
    raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}.')
  pred, onehot = _prepare(pred, target, include_background, sigmoid, softmax)
  valid = _valid_weights(valid, pred.shape[0])
  spatial = tuple(range(1, pred.ndim - 1))
  axes = (0, *spatial) if batch else spatial
  if valid is None:
    masked = lambda x: x
  else:
    example = valid.reshape((-1,) + (1,) * (pred.ndim - 1))
    masked = lambda x: x * example
  tp = jnp.sum(masked(pred * onehot), axis=axes)
  # MONAI's squared_pred goes through vector norms; plain sums of squares are the same numbers.
  power = 2 if squared_pred else 1
  fp = jnp.sum(masked(pred**power), axis=axes) - tp
  fn = jnp.sum(masked(onehot**power), axis=axes) - tp
  if not jaccard:
    fp, fn = 0.5 * fp, 0.5 * fn
  f = 1.0 - (2.0 * tp + smooth_nr) / (2.0 * (tp + fp + fn) + smooth_dr)
  class_weight = _class_weights(weight, pred.shape[-1])
  if class_weight is not None:
    if not isinstance(class_weight, jax.core.Tracer) and float(jnp.min(class_weight)) < 0:
      raise ValueError(f"weight must be >= 0 for every class, got {class_weight}.")
    f = f * class_weight
  if valid is not None and not batch:
    f = f * valid[:, None]
  if reduction == "none":
    return f
  if reduction == "sum":
    return jnp.sum(f)
  if valid is None or batch:
    return jnp.mean(f)
  count = jnp.sum(valid) * f.shape[-1]
  # The max keeps the unselected branch finite, so an all-padding batch has a zero gradient.
  return jnp.where(count > 0, jnp.sum(f) / jnp.maximum(count, 1e-12), 0.0)


def _cross_entropy(
  logits: jax.Array,
  target: jax.Array,
  weight: jax.Array | None,
  valid: jax.Array | None,
  reduction: str,
) -> jax.Array:
  """torch's ``CrossEntropyLoss(weight)`` over the last axis of ``[B, *S, K]`` logits.

  Label maps ``[B, *S]``: the weighted mean divides by the summed weights of the target
  classes, as torch does; one-hot / soft ``[B, *S, K]``: the mean is over voxels.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  num_classes = logits.shape[-1]
  if target.shape == logits.shape[:-1] + (1,):
    target = target[..., 0]
  example = 1.0
  if valid is not None:
    example = valid.reshape((-1,) + (1,) * (logits.ndim - 2))
  if target.shape == logits.shape[:-1]:
    onehot = jax.nn.one_hot(target, num_classes, dtype=jnp.float32)
    voxel_weight = jnp.ones(target.shape) if weight is None else onehot @ weight
    voxel_weight = voxel_weight * example
    nll = -jnp.sum(onehot * log_p, axis=-1) * voxel_weight
    if reduction == "sum":
      return jnp.sum(nll)
    total = jnp.sum(voxel_weight)
    return jnp.where(total > 0, jnp.sum(nll) / jnp.maximum(total, 1e-12), 0.0)
  if target.shape != logits.shape:
    raise ValueError(f"target {target.shape} must be [B, *S] labels or {logits.shape} one-hot.")
  class_term = target.astype(jnp.float32) * log_p
  if weight is not None:
    class_term = class_term * weight
  nll = -jnp.sum(class_term, axis=-1) * example
  if reduction == "sum":
    return jnp.sum(nll)
  count = jnp.sum(jnp.broadcast_to(example, nll.shape))
  return jnp.where(count > 0, jnp.sum(nll) / jnp.maximum(count, 1e-12), 0.0)


def _binary_cross_entropy(
  logits: jax.Array,
  target: jax.Array,
  pos_weight: jax.Array | None,
  valid: jax.Array | None,
  reduction: str,
) -> jax.Array:
  """torch's ``BCEWithLogitsLoss(pos_weight)`` on ``[B, *S, 1]`` logits, mean over elements."""
  if target.shape == logits.shape[:-1]:
    target = target[..., None]
  target = target.astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  positive = target if pos_weight is None else pos_weight * target
  per = -(positive * jax.nn.log_sigmoid(logits) + (1.0 - target) * jax.nn.log_sigmoid(-logits))
  if valid is None:
    return jnp.sum(per) if reduction == "sum" else jnp.mean(per)
  example = jnp.broadcast_to(valid.reshape((-1,) + (1,) * (logits.ndim - 1)), per.shape)
  if reduction == "sum":
    return jnp.sum(per * example)
  count = jnp.sum(example)
  return jnp.where(count > 0, jnp.sum(per * example) / jnp.maximum(count, 1e-12), 0.0)


def dice_ce_loss(
  pred: jax.Array,
  target: jax.Array,
  *,
  include_background: bool = True,
  sigmoid: bool = False,
  softmax: bool = False,
  squared_pred: bool = False,
  jaccard: bool = False,
  smooth_nr: float = 1e-5,
  smooth_dr: float = 1e-5,
  batch: bool = False,
  reduction: Literal["mean", "sum"] = "mean",
  weight: Sequence[float] | jax.Array | None = None,
  lambda_dice: float = 1.0,
  lambda_ce: float = 1.0,
  valid: jax.Array | None = None,
) -> jax.Array:
  """MONAI's ``DiceCELoss``: ``lambda_dice * dice_loss + lambda_ce * cross_entropy``.

  The Dice term is :func:`dice_loss` with the same options (``sigmoid`` / ``softmax`` /
  ``include_background`` act on it only). The cross-entropy term always takes the raw logits and
  every class, as MONAI picks it from the channel count: with ``K > 1`` torch's
  ``CrossEntropyLoss`` (on class indices for a label map, on class probabilities for a one-hot /
  soft target, so a multi-label sigmoid model also gets a softmax cross-entropy, as in MONAI);
  with ``K == 1`` ``BCEWithLogitsLoss``. Both are averaged over every voxel (``"mean"``) or
  summed; MONAI's DiceCELoss has no ``"none"``.

  Args:
    pred: ``[B, *S, K]`` logits.
    target: ``[B, *S]`` integer labels or ``[B, *S, K]`` one-hot / soft targets.
    weight: ``[K]`` class weights of the cross-entropy (``pos_weight`` of the BCE when
      ``K == 1``), also the Dice class weights (without class 0 when ``include_background`` is
      False), as in MONAI.
    lambda_dice / lambda_ce: the weights of the two terms, ``>= 0``.
    valid: ``[B]`` example weights, 0 for padded examples (not in MONAI); see :func:`dice_loss`.
    Other arguments: as :func:`dice_loss`.

  Returns:
    A scalar float32.
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f'reduction must be "mean" or "sum" for dice_ce_loss, got {reduction!r}.')
  if lambda_dice < 0.0 or lambda_ce < 0.0:
    raise ValueError(f"lambda_dice ({lambda_dice}) and lambda_ce ({lambda_ce}) must be >= 0.")
  target = jnp.asarray(target)
  class_weight = None if weight is None else jnp.asarray(weight, jnp.float32)
  dice_weight = class_weight
  if class_weight is not None and not include_background and class_weight.ndim == 1:
    dice_weight = class_weight[1:]
  dice = dice_loss(
    pred,
    target,
    include_background=include_background,
    sigmoid=sigmoid,
    softmax=softmax,
    squared_pred=squared_pred,
    jaccard=jaccard,
    smooth_nr=smooth_nr,
    smooth_dr=smooth_dr,
    batch=batch,
    reduction=reduction,
    weight=dice_weight,
    valid=valid,
  )
  valid = _valid_weights(valid, pred.shape[0])
  if pred.shape[-1] == 1:
    ce = _binary_cross_entropy(pred, target, class_weight, valid, reduction)
  else:
    ce = _cross_entropy(pred, target, class_weight, valid, reduction)
  return lambda_dice * dice + lambda_ce * ce
