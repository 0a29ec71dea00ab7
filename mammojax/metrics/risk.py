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
``[B, N]`` — so a bootstrap resample (``mammojax.metrics.bootstrap``) is a weight vector and
never copies or re-sorts the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SURVIVAL_FLOOR = 1e-6
CONVENTIONS = ("mirai", "bcrbench")
WEIGHTINGS = ("reference", "none")


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


def c_index_batch(
  probs: np.ndarray,
  time: np.ndarray,
  event: np.ndarray,
  weights: np.ndarray,
  survival: np.ndarray,
  convention: str,
) -> np.ndarray:
  """C-index per weight row, on checked inputs (``c_index`` without the checks).

  Args:
    probs: ``[N, Y]``; time, event: ``[N]`` from ``event_times``; weights: ``[B, N]`` exam
      multiplicities; survival: ``[B, Y]`` IPCW curve per row; convention: as in ``c_index``.

  Returns:
    ``[B]`` (NaN: no comparable pair).
  """
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
  values = c_index_batch(probs, time, event, weights, survival, convention)
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


def auc_batch(
  scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, weights: np.ndarray
) -> np.ndarray:
  """Weighted Mann-Whitney AUC per weight row (ties count one half); NaN with one class.

  Args:
    scores: ``[N]``; positive, negative: ``[N]`` bool (exams in neither are left out);
      weights: ``[B, N]`` exam multiplicities.

  Returns:
    ``[B]``.
  """
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
    values = auc_batch(
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
