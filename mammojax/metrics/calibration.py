"""Calibration of cumulative risk: predicted against observed risk per year, by risk bin.

For year ``k`` the exams are split into ``num_bins`` equal-count bins by their predicted risk of
column ``k - 1`` (ties split by exam order). In each bin the predicted risk is the mean
prediction and the observed risk is ``1 - S(k - 1)``, with ``S`` the Kaplan-Meier curve of the
bin's exams on the same event times as the C-index (``risk.event_times``), so censored exams
count for the years they were followed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mammojax.metrics import risk


def calibration_by_bin(
  probs: Any, years_to_cancer: Any, years_to_followup: Any, num_bins: int = 10
) -> dict[str, np.ndarray]:
  """Predicted and Kaplan-Meier observed cumulative risk per year and risk bin.

  Args:
    probs: ``[N, Y]`` predicted cumulative risk of years ``1..Y``, each in ``[0, 1]``.
    years_to_cancer: ``[N]``; ``>= Y`` or inf means no cancer in the horizon.
    years_to_followup: ``[N]``.
    num_bins: risk bins per year (10: deciles); at most ``N``.

  Returns:
    ``predicted``, ``observed``: ``[Y, num_bins]`` risks; ``num_exams``: ``[Y, num_bins]`` exams
    per bin; ``num_cancers``: ``[Y, num_bins]`` cancers within year ``k`` in the bin.
  """
  probs, years_to_cancer, years_to_followup = risk.check_inputs(
    probs, years_to_cancer, years_to_followup
  )
  num_exams, num_years = probs.shape
  if (probs < 0).any() or (probs > 1).any():
    raise ValueError(
      "probs must be probabilities in [0, 1] for calibration (apply the sigmoid to logits first)"
    )
  if not 1 <= num_bins <= num_exams:
    raise ValueError(f"num_bins must be in [1, N = {num_exams}], got {num_bins}")
  time, event = risk.event_times(years_to_cancer, years_to_followup, num_years)
  shape = (num_years, num_bins)
  predicted, observed = np.zeros(shape), np.zeros(shape)
  counts, cancers = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
  for column in range(num_years):
    order = np.argsort(probs[:, column], kind="stable")
    bin_of_rank = np.arange(num_exams) * num_bins // num_exams
    bin_of_exam = np.empty(num_exams, np.int64)
    bin_of_exam[order] = bin_of_rank
    # One weight row per bin selects its exams for a single batched Kaplan-Meier fit.
    membership = (bin_of_exam[None, :] == np.arange(num_bins)[:, None]).astype(np.float64)
    survival = risk.km_survival(time, event, num_years, membership)
    observed[column] = 1.0 - survival[:, column]
    counts[column] = membership.sum(axis=1).astype(np.int64)
    predicted[column] = membership @ probs[:, column] / counts[column]
    cancers[column] = membership @ (event & (time <= column)).astype(np.float64)
  return {"predicted": predicted, "observed": observed, "num_exams": counts, "num_cancers": cancers}
