"""Bootstrap resampling of exam-level metrics by multiplicity weights (numpy only).

A resample is a vector of exam multiplicities ``[N]`` (how many times each exam is drawn), so a
metric that accepts such weights, ``[B, N]`` for ``B`` resamples at once, is bootstrapped
without copying or re-sorting the data. Exams can be resampled one by one or by patient (cluster
bootstrap), and separately within strata so that each resample keeps the stratum sizes.
Intervals are percentile intervals of the resampled values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

# Bootstrap weights are built in chunks of about this many (resample, exam) entries.
_CHUNK_ENTRIES = 4_000_000


class BootstrapCI(NamedTuple):
  """Point estimate on all exams and the percentile interval of the resampled values."""

  point: float
  low: float
  high: float


def _bootstrap_units(
  num_exams: int, patient_ids: Any, strata: Any
) -> tuple[np.ndarray, list[np.ndarray], int]:
  """Resampling unit of each exam ``[N]``, the units of each stratum, and the unit count."""
  if patient_ids is None:
    unit_of_exam = np.arange(num_exams)
  else:
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (num_exams,):
      raise ValueError(f"patient_ids must have shape [{num_exams}], got {patient_ids.shape}")
    _, unit_of_exam = np.unique(patient_ids, return_inverse=True)
  num_units = int(unit_of_exam.max()) + 1
  if strata is None:
    unit_stratum = np.zeros(num_units, np.int64)
  else:
    strata = np.asarray(strata)
    if strata.shape != (num_exams,):
      raise ValueError(f"strata must have shape [{num_exams}], got {strata.shape}")
    _, stratum_of_exam = np.unique(strata, return_inverse=True)
    # A patient belongs to the largest stratum label among its exams (for an event indicator:
    # whether any of its exams is a case).
    unit_stratum = np.zeros(num_units, np.int64)
    np.maximum.at(unit_stratum, unit_of_exam, stratum_of_exam)
  members = [np.flatnonzero(unit_stratum == s) for s in np.unique(unit_stratum)]
  return unit_of_exam, members, num_units


def bootstrap_samples(
  metric_fn: Callable[[np.ndarray], np.ndarray],
  num_exams: int,
  *,
  n_resamples: int,
  seed: int,
  patient_ids: Any = None,
  strata: Any = None,
) -> np.ndarray:
  """Metric values on ``n_resamples`` bootstrap resamples.

  Args:
    metric_fn: maps exam multiplicities ``[B, N]`` (float) to values ``[B]`` or ``[B, ...]``;
      for example ``lambda w: risk.c_index(probs, ytc, ytf, sample_weight=w)``.
    num_exams: ``N``.
    n_resamples: number of resamples.
    seed: seed of ``numpy.random.default_rng``.
    patient_ids: ``[N]``; when given, patients are drawn with replacement and carry all their
      exams (cluster bootstrap).
    strata: ``[N]`` labels; units are drawn separately within each stratum so that each
      resample keeps the stratum sizes (BCRBench stratifies on the cancer indicator).

  Returns:
    ``[n_resamples, ...]`` metric values.
  """
  if n_resamples < 1:
    raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
  unit_of_exam, members, num_units = _bootstrap_units(num_exams, patient_ids, strata)
  rng = np.random.default_rng(seed)
  chunk = max(1, min(n_resamples, _CHUNK_ENTRIES // max(num_exams, 1)))
  values = []
  for start in range(0, n_resamples, chunk):
    rows = min(chunk, n_resamples - start)
    row_offset = (np.arange(rows) * num_units)[:, None]
    flat_draws = np.concatenate(
      [
        (units[rng.integers(0, units.size, size=(rows, units.size))] + row_offset).ravel()
        for units in members
      ]
    )
    unit_counts = np.bincount(flat_draws, minlength=rows * num_units).reshape(rows, num_units)
    values.append(np.asarray(metric_fn(unit_counts[:, unit_of_exam].astype(np.float64))))
  return np.concatenate(values, axis=0)


def percentile_interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
  """``(alpha / 2, 1 - alpha / 2)`` percentiles of the finite ``samples`` ``[M]``; NaNs if none."""
  valid = samples[np.isfinite(samples)]
  if valid.size == 0:
    return math.nan, math.nan
  low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(low), float(high)


def bootstrap_ci(
  metric_fn: Callable[[np.ndarray], np.ndarray],
  num_exams: int,
  *,
  n_resamples: int,
  seed: int,
  alpha: float = 0.05,
  patient_ids: Any = None,
  strata: Any = None,
) -> BootstrapCI:
  """Point estimate and ``1 - alpha`` percentile interval of a scalar metric.

  ``metric_fn`` and the resampling options are those of ``bootstrap_samples``; the point
  estimate is ``metric_fn`` on every exam once. Resamples where the metric is NaN (a single
  class) are left out of the percentiles.
  """
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  point = float(np.asarray(metric_fn(np.ones((1, num_exams)))).reshape(-1)[0])
  samples = bootstrap_samples(
    metric_fn, num_exams, n_resamples=n_resamples, seed=seed, patient_ids=patient_ids, strata=strata
  ).reshape(-1)
  return BootstrapCI(point, *percentile_interval(samples, alpha))
