"""Segmentation metrics on the host (numpy + scipy), N-d, as MONAI defines them.

* :func:`dice_per_class` / :func:`dice_per_subject`: MONAI's ``DiceMetric`` / ``compute_dice``
  on label maps (``num_classes`` given, ``reduction="none"``): ``2 |P & T| / (|P| + |T|)`` per
  class. ``ignore_empty=True`` (MONAI's default) gives NaN when the ground truth of a class is
  empty, whatever the prediction, so a class absent from a subject is skipped by nan-aware means
  (both empty included); ``ignore_empty=False`` gives 1 when both are empty and 0 when only the
  ground truth is.
* :func:`hausdorff95`: MONAI's ``HausdorffDistanceMetric(percentile=95, directed=False)`` /
  ``compute_hausdorff_distance``: the surface voxels are ``mask ^ binary_erosion(mask)``
  (``get_mask_edges``; scipy's cross-shaped element, voxels outside the array count as
  background), the distance of each predicted surface voxel to the nearest true one and back
  (``get_surface_distance``, euclidean, in ``spacing`` units), the 95th percentile (linear
  interpolation, as ``torch.quantile``) of each directed set, then the larger of the two.
  Both masks empty: NaN. Exactly one empty: NaN as well, as MONAI returns it (its distances are
  all inf there and ``torch.quantile`` interpolates ``inf - inf``), so nan-aware means skip such
  subjects: count them; ``percentile=None`` (the plain maximum) gives inf instead.
* :func:`volume_difference`: predicted minus true volume in ml, and relative to the true volume.
* :func:`summarize_dice`: nan-aware per-class summaries with the count of subjects skipped (NaN)
  per class, and MONAI's ``reduction="mean"`` over subjects and classes.
* :func:`wilcoxon_paired`: ``scipy.stats.wilcoxon`` (two-sided) on paired per-subject scores,
  pairs with a NaN dropped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, stats


def _finite_labels(x: Any, name: str) -> np.ndarray:
  """``x`` as an array, with a ValueError for NaN (a float mask or probability map by mistake)."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.floating) and np.isnan(x).any():
    raise ValueError(f"{name} contains NaN: pass label maps or binary masks without NaN.")
  return x


def _check_labels(pred: np.ndarray, true: np.ndarray, num_classes: int) -> None:
  if pred.shape != true.shape:
    raise ValueError(f"pred_labels {pred.shape} and true_labels {true.shape} must match.")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}.")
  for name, x in (("pred_labels", pred), ("true_labels", true)):
    if x.size and (x.min() < 0 or x.max() >= num_classes or np.any(x != np.round(x))):
      raise ValueError(f"{name} must hold integer class indices in [0, {num_classes}).")


def _dice_from_counts(
  intersection: np.ndarray, pred_count: np.ndarray, true_count: np.ndarray, ignore_empty: bool
) -> np.ndarray:
  """MONAI's ``DiceHelper.compute_channel`` on voxel counts (any shape, elementwise)."""
  intersection, pred_count, true_count = (
    np.asarray(a, np.float64) for a in (intersection, pred_count, true_count)
  )
  total = np.maximum(pred_count + true_count, 1.0)
  dice = np.where(true_count > 0, 2.0 * intersection / total, np.nan)
  if not ignore_empty:
    dice = np.where(true_count > 0, dice, np.where(pred_count > 0, 0.0, 1.0))
  return dice


def dice_per_class(
  pred_labels: Any,
  true_labels: Any,
  num_classes: int,
  include_background: bool = True,
  ignore_empty: bool = True,
) -> np.ndarray:
  """Dice of each class between two label maps of one subject (MONAI's ``compute_dice``).

  Args:
    pred_labels / true_labels: ``[*S]`` integer label maps in ``[0, num_classes)``.
    num_classes: K, background included (2 for a binary segmentation).
    include_background: False leaves class 0 out.
    ignore_empty: MONAI's ``ignore_empty``: True gives NaN for a class whose ground truth is
      empty (also when the prediction is empty); False gives 1 (both empty) or 0.

  Returns:
    ``[K]`` float64 (``[K - 1]`` without the background).
  """
  pred = _finite_labels(pred_labels, "pred_labels")
  true = _finite_labels(true_labels, "true_labels")
  _check_labels(pred, true, num_classes)
  # One pass over the voxels: the joint histogram of (true, pred) labels.
  joint = np.bincount(
    (true.astype(np.int64) * num_classes + pred.astype(np.int64)).reshape(-1),
    minlength=num_classes * num_classes,
  ).reshape(num_classes, num_classes)
  dice = _dice_from_counts(np.diag(joint), joint.sum(0), joint.sum(1), ignore_empty)
  return dice if include_background else dice[1:]


def dice_per_subject(
  pred_labels: Any,
  true_labels: Any,
  num_classes: int,
  include_background: bool = True,
  ignore_empty: bool = True,
) -> np.ndarray:
  """:func:`dice_per_class` of each subject: ``[N, *S]`` label maps -> ``[N, K]`` (``[N, K - 1]``
  without the background), MONAI's ``DiceMetric(reduction="none")`` on ``[N, 1, *S]`` labels."""
  pred = np.asarray(pred_labels)
  true = np.asarray(true_labels)
  if pred.shape != true.shape or pred.ndim < 2:
    raise ValueError(
      f"pred_labels {pred.shape} and true_labels {true.shape} must both be [N, *S] label maps."
    )
  rows = [
    dice_per_class(p, t, num_classes, include_background, ignore_empty) for p, t in zip(pred, true)
  ]
  return np.stack(rows) if rows else np.zeros((0, num_classes - (not include_background)))


def _spacing(spacing: Any, ndim: int) -> np.ndarray:
  """``[ndim]`` float64 voxel spacing from None (1), a number, or one per axis."""
  if spacing is None:
    return np.ones(ndim)
  spacing = np.asarray(spacing, np.float64)
  if spacing.ndim == 0:
    spacing = np.full(ndim, float(spacing))
  if spacing.shape != (ndim,):
    raise ValueError(f"spacing must be a number or one value per axis ({ndim}), got {spacing}.")
  if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"spacing must be finite and positive, got {spacing}.")
  return spacing


def _binary_mask(x: Any, name: str) -> np.ndarray:
  x = _finite_labels(x, name)
  if x.dtype != bool and np.any((x != 0) & (x != 1)):
    raise ValueError(f"{name} must be a binary mask (0/1 or bool); threshold or select a label.")
  return x.astype(bool)


def _surface(mask: np.ndarray) -> np.ndarray:
  """MONAI's ``get_mask_edges`` without spacing: the mask minus its erosion. Its crop to the
  foreground box plus a margin of 1 does not change the result, so there is none here."""
  return mask ^ ndimage.binary_erosion(mask)


def _directed_distances(source: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> np.ndarray:
  """Distance of each ``source`` surface voxel to the nearest ``target`` one (both non-empty);
  the exact euclidean distance transform gives what MONAI's KD-tree query gives."""
  distance_to_target = ndimage.distance_transform_edt(~target, sampling=spacing)
  return distance_to_target[source]


def hausdorff95(
  pred_mask: Any, true_mask: Any, spacing: Any = None, percentile: float | None = 95.0
) -> float:
  """The symmetric percentile Hausdorff distance of MONAI's
  ``compute_hausdorff_distance(percentile=95, directed=False)``.

  Args:
    pred_mask / true_mask: ``[*S]`` binary masks (bool or 0/1) of one class.
    spacing: voxel size per axis (or one number), None for 1; the result is in its units.
    percentile: in ``(0, 100]``, 95 by default; None for the classical (maximum) Hausdorff
      distance. MONAI reads 0 as None; here 0 is an error.

  Returns:
    The distance. Both masks empty: NaN. Exactly one empty: NaN with a percentile, inf with
    ``percentile=None``, as MONAI (see the module docstring).
  """
  pred = _binary_mask(pred_mask, "pred_mask")
  true = _binary_mask(true_mask, "true_mask")
  if pred.shape != true.shape:
    raise ValueError(f"pred_mask {pred.shape} and true_mask {true.shape} must match.")
  if percentile is not None and not 0.0 < percentile <= 100.0:
    raise ValueError(f"percentile must be in (0, 100] or None for the maximum, got {percentile}.")
  sampling = _spacing(spacing, pred.ndim)
  pred_surface, true_surface = _surface(pred), _surface(true)
  has_pred, has_true = bool(pred_surface.any()), bool(true_surface.any())
  if not has_pred and not has_true:
    return float("nan")
  if not (has_pred and has_true):
    return float("inf") if percentile is None else float("nan")
  directed = (
    _directed_distances(pred_surface, true_surface, sampling),
    _directed_distances(true_surface, pred_surface, sampling),
  )
  if percentile is None:
    return float(max(d.max() for d in directed))
  return float(max(np.percentile(d, percentile) for d in directed))


def volume_difference(pred_mask: Any, true_mask: Any, spacing: Any) -> tuple[float, float]:
  """Predicted minus true volume.

  Args:
    pred_mask / true_mask: ``[*S]`` binary masks.
    spacing: voxel size in mm, one number or one per axis.

  Returns:
    ``(difference in ml, difference / true volume)``; the relative difference is NaN when the
    true mask is empty.
  """
  pred = _binary_mask(pred_mask, "pred_mask")
  true = _binary_mask(true_mask, "true_mask")
  if pred.shape != true.shape:
    raise ValueError(f"pred_mask {pred.shape} and true_mask {true.shape} must match.")
  voxel_ml = float(np.prod(_spacing(spacing, pred.ndim))) / 1000.0
  pred_ml = float(np.count_nonzero(pred)) * voxel_ml
  true_ml = float(np.count_nonzero(true)) * voxel_ml
  difference = pred_ml - true_ml
  return difference, (difference / true_ml if true_ml > 0 else float("nan"))


def summarize_dice(per_subject: Any, class_names: Sequence[str]) -> dict[str, Any]:
  """Nan-aware summary of per-subject Dice scores.

  Args:
    per_subject: ``[N, K]`` scores, NaN where a subject's class was skipped (empty ground
      truth, see :func:`dice_per_class`).
    class_names: K names.

  Returns:
    ``{"n_subjects": N, "mean": ..., "classes": {name: {"mean", "std", "median", "n_valid",
    "n_skipped"}}}``: per class, the statistics of the non-NaN scores (population std; NaN when
    every subject is skipped) and how many subjects were skipped; ``"mean"`` is MONAI's
    ``reduction="mean"``: each subject's mean over its non-NaN classes, then the mean over
    subjects that have one.
  """
  scores = np.asarray(per_subject, np.float64)
  if scores.ndim != 2 or scores.shape[1] != len(class_names):
    raise ValueError(
      f"per_subject must be [N, K] with K = len(class_names) = {len(class_names)}, "
      f"got {scores.shape}."
    )
  valid = ~np.isnan(scores)
  filled = np.where(valid, scores, 0.0)
  classes = {}
  for k, name in enumerate(class_names):
    values = scores[valid[:, k], k]
    classes[str(name)] = {
      "mean": float(values.mean()) if values.size else float("nan"),
      "std": float(values.std()) if values.size else float("nan"),
      "median": float(np.median(values)) if values.size else float("nan"),
      "n_valid": int(values.size),
      "n_skipped": int(scores.shape[0] - values.size),
    }
  per_row = valid.sum(1)
  subject_means = filled.sum(1)[per_row > 0] / per_row[per_row > 0]
  return {
    "n_subjects": int(scores.shape[0]),
    "mean": float(subject_means.mean()) if subject_means.size else float("nan"),
    "classes": classes,
  }


def wilcoxon_paired(dice_a: Any, dice_b: Any) -> dict[str, float | int]:
  """Two-sided Wilcoxon signed-rank test of paired scores (``scipy.stats.wilcoxon`` defaults:
  zero differences dropped, exact or normal approximation chosen by scipy).

  Args:
    dice_a / dice_b: ``[N]`` scores of two methods on the same subjects; a pair with a NaN on
      either side is dropped.

  Returns:
    ``statistic``, ``p_value``, ``median_difference`` and ``mean_difference`` (of ``a - b``
    over the kept pairs), ``n_pairs`` (kept) and ``n_dropped_nan``. With no pair left every
    value is NaN; when every kept difference is 0, statistic 0 and p-value 1 (scipy's own
    answer, without its division warning).
  """
  a = np.asarray(dice_a, np.float64)
  b = np.asarray(dice_b, np.float64)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"dice_a {a.shape} and dice_b {b.shape} must be [N] of the same length.")
  keep = ~(np.isnan(a) | np.isnan(b))
  difference = a[keep] - b[keep]
  result: dict[str, float | int] = {
    "statistic": float("nan"),
    "p_value": float("nan"),
    "median_difference": float(np.median(difference)) if difference.size else float("nan"),
    "mean_difference": float(difference.mean()) if difference.size else float("nan"),
    "n_pairs": int(difference.size),
    "n_dropped_nan": int(a.size - difference.size),
  }
  if difference.size and not np.any(difference):
    result.update(statistic=0.0, p_value=1.0)
  elif difference.size:
    test = stats.wilcoxon(a[keep], b[keep], alternative="two-sided")
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
  return result
