"""Binary classification metrics (numpy only): ROC AUC, metrics at a decision threshold, and the
threshold that maximises Youden's J.

An example is called positive when its probability is ``>= threshold``. A metric whose
denominator is empty (no positive, or no negative, label) is NaN; balanced accuracy then
averages the one that exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mammojax.metrics.risk import roc_curve


def _as_binary(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """float64 probabilities [N] and bool labels [N] (a label > 0.5 is positive)."""
  probs = np.asarray(probs, np.float64).reshape(-1)
  labels = np.asarray(labels).reshape(-1) > 0.5
  if probs.shape != labels.shape:
    raise ValueError(f"probs {probs.shape} and labels {labels.shape} must have the same length")
  return probs, labels


def roc_auc(probs: Any, labels: Any) -> float:
  """Area under the ROC curve of probs [N] against binary labels [N]; NaN with one class."""
  probs, labels = _as_binary(probs, labels)
  if labels.all() or not labels.any():
    return float("nan")
  fpr, tpr, _ = roc_curve(probs, labels)
  return float(np.trapezoid(tpr, fpr))


def threshold_metrics(probs: Any, labels: Any, threshold: float) -> dict[str, float]:
  """Balanced accuracy, F1 of the positive class, sensitivity and specificity when
  ``probs >= threshold`` is called positive.

  Args:
    probs: [N] predicted probabilities; labels: [N] binary.
    threshold: the decision threshold (NaN gives NaN metrics).
  """
  probs, labels = _as_binary(probs, labels)
  if np.isnan(threshold):
    return dict.fromkeys(("balanced_accuracy", "f1", "sensitivity", "specificity"), float("nan"))
  predicted = probs >= threshold
  tp = float(np.sum(predicted & labels))
  fp = float(np.sum(predicted & ~labels))
  fn = float(np.sum(~predicted & labels))
  tn = float(np.sum(~predicted & ~labels))
  sensitivity = tp / (tp + fn) if tp + fn else float("nan")
  specificity = tn / (tn + fp) if tn + fp else float("nan")
  return {
    "balanced_accuracy": float(np.nanmean([sensitivity, specificity])),
    "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    "sensitivity": sensitivity,
    "specificity": specificity,
  }


def youden_threshold(probs: Any, labels: Any) -> float:
  """The threshold maximising Youden's J = sensitivity + specificity - 1.

  The candidates are the distinct probabilities (calling every example at or above one of them
  positive); on a tie the highest wins. NaN when the labels hold one class only.

  Args:
    probs: [N] predicted probabilities; labels: [N] binary.
  """
  probs, labels = _as_binary(probs, labels)
  if labels.all() or not labels.any():
    return float("nan")
  fpr, tpr, thresholds = roc_curve(probs, labels)
  # Point 0 (threshold inf, nothing positive) has J = 0; a J <= 0 classifier keeps it out.
  best = 1 + int(np.argmax((tpr - fpr)[1:]))
  return float(thresholds[best])


def classification_metrics(probs: Any, labels: Any, threshold: float = 0.5) -> dict[str, float]:
  """AUC; balanced accuracy, F1, sensitivity and specificity at ``threshold``; the Youden
  threshold of these labels (``youden_threshold``) and the four metrics at it (``<name>_youden``).

  Args:
    probs: [N] predicted probabilities; labels: [N] binary.
  """
  youden = youden_threshold(probs, labels)
  at_youden = threshold_metrics(probs, labels, youden)
  return {
    "auc": roc_auc(probs, labels),
    **threshold_metrics(probs, labels, threshold),
    "youden_threshold": youden,
    **{f"{k}_youden": v for k, v in at_youden.items()},
  }
