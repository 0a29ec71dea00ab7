"""Binary classification metrics: AUC, metrics at a threshold, the Youden threshold (by hand)."""

import numpy as np
import pytest

from mammojax.metrics.classification import (
  classification_metrics,
  roc_auc,
  threshold_metrics,
  youden_threshold,
)

# Six examples, a tie at 0.7 between a positive and a negative. Calling ">= t" positive:
#   t = 0.9: TP 1, FP 0 -> sensitivity 1/3, specificity 1   -> J 1/3
#   t = 0.7: TP 2, FP 1 -> 2/3, 2/3                         -> J 1/3
#   t = 0.4: TP 3, FP 1 -> 1,   2/3                         -> J 2/3 (the maximum)
#   t = 0.2: TP 3, FP 3 -> 1,   0                           -> J 0
PROBS = np.array([0.9, 0.7, 0.7, 0.4, 0.2, 0.2])
LABELS = np.array([1, 1, 0, 1, 0, 0])


def test_metrics_at_a_threshold_by_hand():
  m = threshold_metrics(PROBS, LABELS, 0.5)  # TP 2, FP 1, FN 1, TN 2
  assert m["sensitivity"] == pytest.approx(2 / 3)
  assert m["specificity"] == pytest.approx(2 / 3)
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  # The threshold itself counts as positive: at 0.7 both tied examples are called positive.
  assert threshold_metrics(PROBS, LABELS, 0.7)["specificity"] == pytest.approx(2 / 3)
  assert threshold_metrics(PROBS, LABELS, 0.71)["specificity"] == pytest.approx(1.0)


def test_youden_threshold_and_metrics_at_it_by_hand():
  assert youden_threshold(PROBS, LABELS) == pytest.approx(0.4)
  m = classification_metrics(PROBS, LABELS, threshold=0.5)
  # Positive/negative pairs: 0.9 beats 3; 0.7 ties one (1/2) and beats 2; 0.4 beats 2.
  assert m["auc"] == pytest.approx(7.5 / 9)
  assert m["balanced_accuracy"] == pytest.approx(2 / 3)
  assert m["youden_threshold"] == pytest.approx(0.4)
  assert m["sensitivity_youden"] == pytest.approx(1.0)
  assert m["specificity_youden"] == pytest.approx(2 / 3)
  assert m["balanced_accuracy_youden"] == pytest.approx(5 / 6)
  assert m["f1_youden"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))


def test_youden_ties_take_the_highest_threshold():
  # J = 1/2 at 0.8 (TP 1, FP 0) and at 0.4 (TP 2, FP 1): 0.8 calls fewer examples positive.
  assert youden_threshold([0.8, 0.6, 0.4, 0.2], [1, 0, 1, 0]) == pytest.approx(0.8)
  # A perfect ranking: the lowest positive score separates the classes.
  assert youden_threshold([0.1, 0.35, 0.3, 0.9], [0, 1, 0, 1]) == pytest.approx(0.35)


def test_one_class_gives_nan_and_bad_shapes_an_error():
  m = classification_metrics(np.array([0.2, 0.4]), np.array([1, 1]))
  assert np.isnan(m["auc"]) and np.isnan(m["youden_threshold"])
  assert np.isnan(m["balanced_accuracy_youden"]) and np.isnan(m["specificity"])
  assert m["sensitivity"] == 0.0 and m["balanced_accuracy"] == 0.0
  assert np.isnan(roc_auc([0.3], [0]))
  with pytest.raises(ValueError, match="same length"):
    classification_metrics(np.zeros(3), np.zeros(2))
