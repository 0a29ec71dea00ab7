"""Evaluation metrics of cumulative breast-cancer risk models (numpy only).

Definitions follow the public references (yala/Mirai ``onconet/learn/utils.py`` and
``onconet/utils/c_index.py``; BCRBench ``src/utils/c_index.py`` and ``src/utils/utils.py``):

* Event time (0-based year index, ``time_at_event`` in Mirai): an exam with cancer diagnosed
  ``t = floor(years_to_cancer) < Y`` years after it is an *event* at ``t``; any other exam is
  *censored* at ``min(floor(years_to_followup), Y) - 1``. An exam without cancer and with less
  than one year of follow-up gets time ``-1`` and takes part in no pair, no AUC and no
  Kaplan-Meier count (the references drop such exams when building the dataset).
* C-index: ordered pairs ``(j, i)`` where ``j`` is an event and either ``i`` is an event with
  ``T_j < T_i`` or ``i`` is censored with ``T_j <= T_i``. Both exams are scored with the risk
  column of the later time ``T_i``; the pair is concordant when ``probs[j, T_i] > probs[i, T_i]``
  and counts one half when equal. Each pair has weight ``1 / S(T_i)^2`` where ``S`` is the
  Kaplan-Meier curve fitted with cancer as the event (the references call it the "censoring
  distribution", but fit it on ``(time_at_event, cancer)``), floored at ``1e-6`` as BCRBench does.
* AUC of year ``k`` (column ``k - 1``): positives are events with ``T <= k - 1``; negatives are
  all other exams with ``T >= k - 1``, i.e. cancer-free exams followed up at least ``k`` years and
  exams whose cancer came after year ``k``.

Every metric accepts ``sample_weight`` — how many times each exam is counted, ``[N]`` or a batch
``[B, N]`` — so a bootstrap resample is a weight vector and never copies or re-sorts the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

SURVIVAL_FLOOR = 1e-6
CONVENTIONS = ("mirai", "bcrbench")
WEIGHTINGS = ("reference", "none")
# Bootstrap weights are built in chunks of about this many (resample, exam) entries.
_CHUNK_ENTRIES = 4_000_000


# ---------------------------------------------------------------------------------------------
# Input checks and event times.


def _as_probs(probs: Any) -> np.ndarray:
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
    raise ValueError(
      f"probs must be [N, Y] with N, Y >= 1 (risk of years 1..Y per exam), got shape {probs.shape}"
    )
  bad = ~np.isfinite(probs)
  if bad.any():
    exam = int(np.argwhere(bad)[0, 0])
    raise ValueError(
      f"probs has {int(bad.sum())} NaN/inf entries (first at exam {exam}); "
      f"drop or fix those exams before computing metrics"
    )
  return probs


def _as_years(name: str, values: Any, num_exams: int, allow_inf: bool) -> np.ndarray:
  values = np.asarray(values, dtype=np.float64)
  if values.shape != (num_exams,):
    raise ValueError(
      f"{name} must have shape [{num_exams}] (one value per row of probs), got {values.shape}"
    )
  bad = np.isnan(values) | (values < 0) | (np.isinf(values) & (not allow_inf))
  if bad.any():
    exam = int(np.argmax(bad))
    hint = (
      " (use a sentinel >= Y, such as 100, for 'no cancer')" if name == "years_to_cancer" else ""
    )
    raise ValueError(
      f"{name} must be >= 0 and not NaN{'' if allow_inf else ' or inf'}; "
      f"exam {exam} has {values[exam]!r}{hint}"
    )
  return values


def check_inputs(
  probs: Any, years_to_cancer: Any, years_to_followup: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated float64 copies of ``probs`` ``[N, Y]`` and the two ``[N]`` year arrays.

  Raises ValueError naming the array for a wrong shape, NaN/inf risk, NaN or negative years,
  or infinite follow-up (an infinite ``years_to_cancer`` means no cancer).
  """
  probs = _as_probs(probs)
  years_to_cancer = _as_years("years_to_cancer", years_to_cancer, probs.shape[0], True)
  years_to_followup = _as_years("years_to_followup", years_to_followup, probs.shape[0], False)
  return probs, years_to_cancer, years_to_followup


def _as_weights(sample_weight: Any, num_exams: int) -> tuple[np.ndarray, bool]:
  """Returns weights ``[B, N]`` and whether the caller passed a batch."""
  if sample_weight is None:
    return np.ones((1, num_exams)), False
  weights = np.asarray(sample_weight, dtype=np.float64)
  batched = weights.ndim == 2
  if weights.ndim not in (1, 2) or weights.shape[-1] != num_exams:
    raise ValueError(
      f"sample_weight must be [N] or [B, N] with N = {num_exams}, got shape {weights.shape}"
    )
  if not np.isfinite(weights).all() or (weights < 0).any():
    raise ValueError("sample_weight must be finite and >= 0")
  return (weights if batched else weights[None]), batched


def event_times(
  years_to_cancer: Any, years_to_followup: Any, num_years: int
) -> tuple[np.ndarray, np.ndarray]:
  """Year index of the event or censoring, and whether it is a cancer.

  Args:
    years_to_cancer: ``[N]`` years from exam to diagnosis; ``>= num_years`` (or inf) = none.
    years_to_followup: ``[N]`` years of follow-up after the exam.
    num_years: horizon ``Y``.

  Returns:
    ``time`` ``[N]`` int64 in ``[-1, Y - 1]`` and ``event`` ``[N]`` bool (see module docstring).
  """
  years_to_cancer = np.asarray(years_to_cancer, dtype=np.float64)
  years_to_cancer = _as_years(
    "years_to_cancer",
    years_to_cancer,
    years_to_cancer.shape[0] if years_to_cancer.ndim else -1,
    True,
  )
  years_to_followup = _as_years(
    "years_to_followup", years_to_followup, years_to_cancer.shape[0], False
  )
  event = years_to_cancer < num_years
  censored_time = np.minimum(np.floor(years_to_followup), num_years) - 1
  time = np.where(event, np.floor(np.where(event, years_to_cancer, 0.0)), censored_time)
  return time.astype(np.int64), event


def years_from_targets(target: Any, y_mask: Any) -> tuple[np.ndarray, np.ndarray]:
  """Inverts ``mammojax.data.survival.survival_targets`` on a batch.

  Args:
    target: ``[N, Y]`` cumulative 0/1 targets.
    y_mask: ``[N, Y]`` 0/1 masks of observed years.

  Returns:
    ``years_to_cancer`` ``[N]`` (``Y``, i.e. no cancer inside the horizon, for negatives) and
    ``years_to_followup`` ``[N]`` (number of observed years) that rebuild the same targets.
  """
  target = np.asarray(target)
  y_mask = np.asarray(y_mask)
  if target.ndim != 2 or target.shape != y_mask.shape:
    raise ValueError(
      f"target and y_mask must both be [N, Y]; got {target.shape} and {y_mask.shape}"
    )
  positive = target > 0.5
  event = positive[:, -1]
  first_positive = np.argmax(positive, axis=1).astype(np.float64)
  years_to_cancer = np.where(event, first_positive, float(target.shape[1]))
  years_to_followup = (y_mask > 0.5).sum(axis=1).astype(np.float64)
  return years_to_cancer, years_to_followup


def km_survival(
  time: np.ndarray, event: np.ndarray, num_years: int, sample_weight: Any = None
) -> np.ndarray:
  """Kaplan-Meier curve at year indices ``0..Y-1`` (right-continuous, as lifelines' predict).

  ``S(t) = prod_{s <= t} (1 - d_s / n_s)`` with ``d_s`` weighted events at ``s`` and ``n_s``
  weighted exams with time ``>= s``. Exams with time ``-1`` are never at risk.

  Returns:
    ``[Y]``, or ``[B, Y]`` for ``[B, N]`` weights.
  """
  weights, batched = _as_weights(sample_weight, time.shape[0])
  in_range = (time >= 0) & (time < num_years)
  slot = np.where(in_range, time, num_years)
  onehot = np.zeros((time.shape[0], num_years + 1))
  onehot[np.arange(time.shape[0]), slot] = 1.0
  exits = weights @ onehot[:, :num_years]
  deaths = weights @ (onehot[:, :num_years] * event[:, None])
  at_risk = np.cumsum(exits[:, ::-1], axis=1)[:, ::-1]
  hazard = np.divide(deaths, at_risk, out=np.zeros_like(deaths), where=at_risk > 0)
  survival = np.cumprod(1.0 - hazard, axis=1)
  return survival if batched else survival[0]


def reference_weight_survival(
  years_to_cancer: Any, years_to_followup: Any, num_years: int
) -> np.ndarray:
  """The references' IPCW curve ``S`` ``[Y]``: Kaplan-Meier with cancer as the event.

  Mirai fits it on the training set; BCRBench on the evaluated set. Pass the result as
  ``weight_survival`` to score a test set with a training-set curve.
  """
  time, event = event_times(years_to_cancer, years_to_followup, num_years)
  return np.maximum(km_survival(time, event, num_years), SURVIVAL_FLOOR)


# ---------------------------------------------------------------------------------------------
# Weighted pair counting.


def _weighted_greater_equal(
  pool_scores: np.ndarray, pool_weights: np.ndarray, query_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """For each query: total pool weight with a strictly greater score, and with an equal score.

  Args:
    pool_scores: ``[P]``; pool_weights: ``[B, P]``; query_scores: ``[Q]``.

  Returns:
    two ``[B, Q]`` arrays.
  """
  order = np.argsort(pool_scores, kind="stable")
  sorted_scores = pool_scores[order]
  cumulative = np.zeros((pool_weights.shape[0], order.size + 1))
  np.cumsum(pool_weights[:, order], axis=1, out=cumulative[:, 1:])
  below = np.searchsorted(sorted_scores, query_scores, side="left")
  through = np.searchsorted(sorted_scores, query_scores, side="right")
  at_or_below = cumulative[:, through]
  greater = cumulative[:, -1:] - at_or_below
  equal = at_or_below - cumulative[:, below]
  return greater, equal


def _c_index_batch(
  probs: np.ndarray,
  time: np.ndarray,
  event: np.ndarray,
  weights: np.ndarray,
  survival: np.ndarray,
  convention: str,
) -> np.ndarray:
  """C-index per weight row. ``survival`` is ``[B, Y]``; returns ``[B]`` (NaN: no pairs)."""
  num_years = probs.shape[1]
  concordant = np.zeros(weights.shape[0])
  pairs = np.zeros(weights.shape[0])
  for t in range(num_years):
    pool = np.flatnonzero(event & (time <= t))
    exits = np.flatnonzero(time == t)
    if pool.size == 0 or exits.size == 0:
      continue
    query_column = t if convention == "mirai" else (t - 1) % num_years
    pool_weights_all = weights[:, pool]
    pool_weights_before = pool_weights_all * (time[pool] < t)
    query_scores = probs[exits, query_column]
    query_weights = weights[:, exits]
    exit_is_event = event[exits]
    at_t = np.zeros(weights.shape[0])
    pairs_t = np.zeros(weights.shape[0])
    # An event at t is compared with earlier events only; a censoring at t also with events at t.
    for pool_weights, queries in (
      (pool_weights_before, exit_is_event),
      (pool_weights_all, ~exit_is_event),
    ):
      if not queries.any():
        continue
      greater, equal = _weighted_greater_equal(probs[pool, t], pool_weights, query_scores[queries])
      weight_q = query_weights[:, queries]
      at_t += np.sum(weight_q * (greater + 0.5 * equal), axis=1)
      pairs_t += weight_q.sum(axis=1) * pool_weights.sum(axis=1)
    inverse_square = 1.0 / survival[:, t] ** 2
    concordant += at_t * inverse_square
    pairs += pairs_t * inverse_square
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, concordant / np.where(pairs > 0, pairs, 1.0), np.nan)


def c_index(
  probs: Any,
  years_to_cancer: Any,
  years_to_followup: Any,
  *,
  weighting: str = "reference",
  weight_survival: Any = None,
  convention: str = "mirai",
  sample_weight: Any = None,
) -> float | np.ndarray:
  """Time-dependent, IPCW-weighted concordance index of Mirai / BCRBench.

  Args:
    probs: ``[N, Y]`` predicted cumulative risk of years ``1..Y``.
    years_to_cancer: ``[N]`` years to diagnosis; ``>= Y`` or inf means no cancer in the horizon.
    years_to_followup: ``[N]`` years of follow-up.
    weighting: ``'reference'`` (pair weight ``1 / S(T_later)^2``, see the module docstring) or
      ``'none'`` (every pair weight 1: Harrell's C with lifelines' tie rules).
    weight_survival: ``[Y]`` curve ``S`` to use (e.g. ``reference_weight_survival`` of a
      training set, as Mirai); default: fitted on the (weighted) data given, as BCRBench.
    convention: ``'mirai'`` scores both exams of a pair with column ``T_later``;
      ``'bcrbench'`` reproduces BCRBench, which reads the later exam's score from column
      ``T_later - 1`` (column ``Y - 1`` when ``T_later = 0``) and the earlier exam's from
      ``T_later``.
    sample_weight: ``[N]`` or ``[B, N]`` multiplicity of each exam.

  Returns:
    a float, or ``[B]`` for batched weights; NaN when no pair is comparable.
  """
  probs, years_to_cancer, years_to_followup = check_inputs(
    probs, years_to_cancer, years_to_followup
  )
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  num_years = probs.shape[1]
  weights, batched = _as_weights(sample_weight, probs.shape[0])
  time, event = event_times(years_to_cancer, years_to_followup, num_years)
  if weighting == "none":
    survival = np.ones((weights.shape[0], num_years))
  elif weight_survival is not None:
    survival = np.asarray(weight_survival, dtype=np.float64)
    if survival.shape != (num_years,) or not np.all((survival > 0) & (survival <= 1)):
      raise ValueError(
        f"weight_survival must be [{num_years}] with values in (0, 1], got shape {survival.shape}"
      )
    survival = np.broadcast_to(survival, (weights.shape[0], num_years))
  else:
    survival = np.maximum(km_survival(time, event, num_years, weights), SURVIVAL_FLOOR)
  values = _c_index_batch(probs, time, event, weights, survival, convention)
  return values if batched else float(values[0])


# ---------------------------------------------------------------------------------------------
# Per-year AUC.


def year_labels(
  years_to_cancer: Any, years_to_followup: Any, num_years: int
) -> tuple[np.ndarray, np.ndarray]:
  """Which exams count for the AUC of each year, and their label.

  Returns:
    ``included`` and ``positive``, both ``[N, Y]`` bool; column ``k - 1`` is year ``k``.
  """
  time, event = event_times(years_to_cancer, years_to_followup, num_years)
  year_index = np.arange(num_years)[None, :]
  positive = event[:, None] & (time[:, None] <= year_index)
  included = positive | (time[:, None] >= year_index)
  return included, positive


def _auc_batch(
  scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, weights: np.ndarray
) -> np.ndarray:
  """Weighted Mann-Whitney AUC per weight row (ties count one half); NaN with one class."""
  positives = np.flatnonzero(positive)
  negatives = np.flatnonzero(negative)
  if positives.size == 0 or negatives.size == 0:
    return np.full(weights.shape[0], np.nan)
  pool_weights = weights[:, positives]
  greater, equal = _weighted_greater_equal(scores[positives], pool_weights, scores[negatives])
  negative_weights = weights[:, negatives]
  wins = np.sum(negative_weights * (greater + 0.5 * equal), axis=1)
  total = pool_weights.sum(axis=1) * negative_weights.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def auc_per_year(
  probs: Any, years_to_cancer: Any, years_to_followup: Any, *, sample_weight: Any = None
) -> dict[int, float | np.ndarray]:
  """AUC of column ``k - 1`` among the exams that count for year ``k``, for ``k = 1..Y``.

  Returns:
    ``{k: auc}`` (floats, or ``[B]`` arrays for batched weights); NaN for a year with a single
    class.
  """
  probs, years_to_cancer, years_to_followup = check_inputs(
    probs, years_to_cancer, years_to_followup
  )
  num_years = probs.shape[1]
  weights, batched = _as_weights(sample_weight, probs.shape[0])
  included, positive = year_labels(years_to_cancer, years_to_followup, num_years)
  result: dict[int, float | np.ndarray] = {}
  for column in range(num_years):
    values = _auc_batch(
      probs[:, column], positive[:, column], included[:, column] & ~positive[:, column], weights
    )
    result[column + 1] = values if batched else float(values[0])
  return result


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC points, one per distinct score, from the highest threshold down.

  Args:
    scores: ``[M]`` risk scores; labels: ``[M]`` bool.

  Returns:
    ``false_positive_rate``, ``true_positive_rate`` (both starting at 0 and ending at 1) and the
    ``thresholds`` ``[K]`` (``inf`` first).
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels, dtype=bool)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(f"scores and labels must be [M]; got {scores.shape} and {labels.shape}")
  if labels.all() or not labels.any():
    raise ValueError("roc_curve needs at least one positive and one negative label")
  order = np.argsort(-scores, kind="stable")
  sorted_scores = scores[order]
  true_positives = np.cumsum(labels[order])
  false_positives = np.arange(1, scores.size + 1) - true_positives
  last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
  tpr = np.r_[0.0, true_positives[last_of_run] / labels.sum()]
  fpr = np.r_[0.0, false_positives[last_of_run] / (~labels).sum()]
  return fpr, tpr, np.r_[np.inf, sorted_scores[last_of_run]]


# ---------------------------------------------------------------------------------------------
# Bootstrap.


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
      for example ``lambda w: c_index(probs, ytc, ytf, sample_weight=w)``.
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


def _percentile_interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
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
  return BootstrapCI(point, *_percentile_interval(samples, alpha))


# ---------------------------------------------------------------------------------------------
# Report.


def _json_float(value: float) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def _interval(point: float, samples: np.ndarray | None, alpha: float) -> dict[str, Any]:
  block: dict[str, Any] = {"point": _json_float(point)}
  if samples is not None:
    low, high = _percentile_interval(samples, alpha)
    valid = samples[np.isfinite(samples)]
    block.update(
      low=_json_float(low),
      high=_json_float(high),
      bootstrap_mean=_json_float(valid.mean()) if valid.size else None,
      valid_resamples=int(valid.size),
    )
  return block


def _metric_block(
  probs: np.ndarray,
  years_to_cancer: np.ndarray,
  years_to_followup: np.ndarray,
  survival: np.ndarray,
  n_bootstrap: int,
  seed: int,
  alpha: float,
  patient_ids: np.ndarray | None,
) -> dict[str, Any]:
  """C-index and per-year AUC (with intervals when ``n_bootstrap > 0``) of one set of exams."""
  num_years = probs.shape[1]
  included, positive = year_labels(years_to_cancer, years_to_followup, num_years)
  negative = included & ~positive
  time, event = event_times(years_to_cancer, years_to_followup, num_years)

  def all_metrics(weights: np.ndarray) -> np.ndarray:
    columns = [
      _c_index_batch(
        probs,
        time,
        event,
        weights,
        np.broadcast_to(survival, (weights.shape[0], num_years)),
        "mirai",
      )
    ]
    columns += [
      _auc_batch(probs[:, k], positive[:, k], negative[:, k], weights) for k in range(num_years)
    ]
    return np.stack(columns, axis=1)

  point = all_metrics(np.ones((1, probs.shape[0])))[0]
  samples = None
  if n_bootstrap > 0:
    samples = bootstrap_samples(
      all_metrics,
      probs.shape[0],
      n_resamples=n_bootstrap,
      seed=seed,
      patient_ids=patient_ids,
      strata=event,
    )
  column = (lambda i: None) if samples is None else (lambda i: samples[:, i])
  return {
    "num_exams": int(probs.shape[0]),
    "num_cancers": int(event.sum()),
    "c_index": _interval(point[0], column(0), alpha),
    "auc_year": {
      str(k + 1): _interval(point[k + 1], column(k + 1), alpha) for k in range(num_years)
    },
    "counts_year": {
      str(k + 1): {"positives": int(positive[:, k].sum()), "negatives": int(negative[:, k].sum())}
      for k in range(num_years)
    },
  }


def subgroup_metrics(
  probs: Any,
  years_to_cancer: Any,
  years_to_followup: Any,
  subgroups: Mapping[str, Any],
  *,
  n_bootstrap: int = 0,
  seed: int = 0,
  alpha: float = 0.05,
  weight_survival: Any = None,
  patient_ids: Any = None,
) -> dict[str, dict[str, dict[str, Any]]]:
  """The report's metric block for every value of every subgroup column.

  Args:
    subgroups: ``{column name: [N] values}`` (ints or strings, e.g. density 1-4).
    weight_survival: ``[Y]`` IPCW curve; default: fitted on all exams (not per subgroup), as
      BCRBench does.
    Others as in ``risk_report``.

  Returns:
    ``{column: {str(value): block}}`` where a block has ``num_exams``, ``num_cancers``,
    ``c_index``, ``auc_year`` and ``counts_year``.
  """
  probs, years_to_cancer, years_to_followup = check_inputs(
    probs, years_to_cancer, years_to_followup
  )
  num_exams, num_years = probs.shape
  survival = (
    reference_weight_survival(years_to_cancer, years_to_followup, num_years)
    if weight_survival is None
    else np.asarray(weight_survival, dtype=np.float64)
  )
  if patient_ids is not None:
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (num_exams,):
      raise ValueError(f"patient_ids must have shape [{num_exams}], got {patient_ids.shape}")
  result: dict[str, dict[str, dict[str, Any]]] = {}
  for name, values in subgroups.items():
    values = np.asarray(values)
    if values.shape != (num_exams,):
      raise ValueError(f"subgroup {name!r} must have shape [{num_exams}], got {values.shape}")
    blocks = {}
    for value in np.unique(values):
      members = np.flatnonzero(values == value)
      blocks[str(value.item() if hasattr(value, "item") else value)] = _metric_block(
        probs[members],
        years_to_cancer[members],
        years_to_followup[members],
        survival,
        n_bootstrap,
        seed,
        alpha,
        None if patient_ids is None else patient_ids[members],
      )
    result[name] = blocks
  return result


def risk_report(
  probs: Any,
  years_to_cancer: Any,
  years_to_followup: Any,
  subgroups: Mapping[str, Any] | None = None,
  n_bootstrap: int = 1000,
  seed: int = 0,
  *,
  alpha: float = 0.05,
  weight_survival: Any = None,
  patient_ids: Any = None,
) -> dict[str, Any]:
  """All risk metrics of one evaluation as a JSON-serialisable dict (NaN written as null).

  Args:
    probs: ``[N, Y]`` predicted cumulative risk of years ``1..Y``.
    years_to_cancer: ``[N]``; ``>= Y`` or inf means no cancer in the horizon.
    years_to_followup: ``[N]``.
    subgroups: optional ``{column name: [N] values}``; each value gets its own block.
    n_bootstrap: resamples for the percentile intervals (0: point estimates only). Cases and
      controls are resampled separately, as BCRBench does.
    seed: bootstrap seed.
    alpha: intervals cover ``1 - alpha``.
    weight_survival: ``[Y]`` IPCW curve (e.g. from the training set, as Mirai); default: fitted
      on these exams, as BCRBench. Resamples and subgroups reuse it, as BCRBench does.
    patient_ids: ``[N]``; when given, the bootstrap resamples patients.

  Returns:
    ``{num_exams, num_cancers, num_years, c_index: {point, low, high, bootstrap_mean,
    valid_resamples}, auc_year: {"k": {...}}, counts_year: {"k": {positives, negatives}},
    weight_survival: [Y], bootstrap: {...}, subgroups: {column: {value: block}}}``.
  """
  probs, years_to_cancer, years_to_followup = check_inputs(
    probs, years_to_cancer, years_to_followup
  )
  num_years = probs.shape[1]
  if weight_survival is None:
    survival = reference_weight_survival(years_to_cancer, years_to_followup, num_years)
  else:
    survival = np.asarray(weight_survival, dtype=np.float64)
    if survival.shape != (num_years,) or not np.all((survival > 0) & (survival <= 1)):
      raise ValueError(f"weight_survival must be [{num_years}] with values in (0, 1]")
  if patient_ids is not None:
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (probs.shape[0],):
      raise ValueError(f"patient_ids must have shape [{probs.shape[0]}], got {patient_ids.shape}")
  report = _metric_block(
    probs, years_to_cancer, years_to_followup, survival, n_bootstrap, seed, alpha, patient_ids
  )
  report["num_years"] = int(num_years)
  report["weight_survival"] = [float(s) for s in survival]
  report["bootstrap"] = {
    "n_resamples": int(n_bootstrap),
    "seed": int(seed),
    "alpha": float(alpha),
    "unit": "exam" if patient_ids is None else "patient",
    "stratified_by": "cancer within horizon",
  }
  report["subgroups"] = subgroup_metrics(
    probs,
    years_to_cancer,
    years_to_followup,
    subgroups or {},
    n_bootstrap=n_bootstrap,
    seed=seed,
    alpha=alpha,
    weight_survival=survival,
    patient_ids=patient_ids,
  )
  return report
