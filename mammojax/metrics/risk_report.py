"""The JSON evaluation report of a cumulative risk model (numpy only).

``risk_report`` gathers the C-index and per-year AUCs of ``mammojax.metrics.risk`` (definitions
in that module's docstring) with their bootstrap percentile intervals
(``mammojax.metrics.bootstrap``: cases and controls resampled separately, optionally by patient)
and the per-year positive/negative counts, for all exams and for every value of each subgroup
column. All metrics of one resample are computed from the same multiplicity weights; NaN values
are written as null.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mammojax.metrics.bootstrap import bootstrap_samples, percentile_interval
from mammojax.metrics.risk import (
  auc_batch,
  c_index_batch,
  check_inputs,
  event_times,
  reference_weight_survival,
  year_labels,
)


def _json_float(value: float) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def _interval(point: float, samples: np.ndarray | None, alpha: float) -> dict[str, Any]:
  block: dict[str, Any] = {"point": _json_float(point)}
  if samples is not None:
    low, high = percentile_interval(samples, alpha)
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
      c_index_batch(
        probs,
        time,
        event,
        weights,
        np.broadcast_to(survival, (weights.shape[0], num_years)),
        "mirai",
      )
    ]
    columns += [
      auc_batch(probs[:, k], positive[:, k], negative[:, k], weights) for k in range(num_years)
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
