"""PNG plots and the on-disk report of a risk evaluation.

matplotlib is the optional ``viz`` extra: it is imported inside the functions, and figures are
drawn on an explicit Agg canvas so the process-wide pyplot backend is never touched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mammojax.atomic_files import atomic_write
from mammojax.metrics import calibration, risk
from mammojax.viz.figures import save_png


def _new_figure(width: float, height: float) -> Any:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(figure)
  return figure


def plot_roc_per_year(
  path: str | os.PathLike, probs: Any, years_to_cancer: Any, years_to_followup: Any
) -> Path:
  """ROC curve of every year with two classes (inclusion rule of ``risk.year_labels``).

  Args:
    path: PNG file to write.
    probs: ``[N, Y]`` predicted cumulative risk; the other two arrays are ``[N]`` years.

  Returns:
    the written path.
  """
  probs, years_to_cancer, years_to_followup = risk.check_inputs(
    probs, years_to_cancer, years_to_followup
  )
  included, positive = risk.year_labels(years_to_cancer, years_to_followup, probs.shape[1])
  aucs = risk.auc_per_year(probs, years_to_cancer, years_to_followup)
  figure = _new_figure(5.5, 5.0)
  axes = figure.add_subplot()
  axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
  for column in range(probs.shape[1]):
    labels = positive[included[:, column], column]
    if np.isnan(aucs[column + 1]):
      continue
    fpr, tpr, _ = risk.roc_curve(probs[included[:, column], column], labels)
    axes.plot(
      fpr,
      tpr,
      linewidth=1.5,
      label=f"year {column + 1}: AUC {aucs[column + 1]:.3f} "
      f"({int(labels.sum())}+/{int((~labels).sum())}-)",
    )
  axes.set(
    xlabel="false positive rate",
    ylabel="true positive rate",
    xlim=(0, 1),
    ylim=(0, 1),
    title="ROC per year",
  )
  axes.legend(loc="lower right", fontsize=8)
  return Path(save_png(figure, path))


def plot_calibration(path: str | os.PathLike, calibration_arrays: dict[str, np.ndarray]) -> Path:
  """Observed against predicted cumulative risk per year (one line per year, one point per bin).

  Args:
    path: PNG file to write.
    calibration_arrays: the dict of ``calibration.calibration_by_bin``.

  Returns:
    the written path.
  """
  predicted = calibration_arrays["predicted"]
  observed = calibration_arrays["observed"]
  figure = _new_figure(5.5, 5.0)
  axes = figure.add_subplot()
  limit = float(max(predicted.max(), observed.max(), 1e-3)) * 1.05
  axes.plot([0, limit], [0, limit], color="0.6", linestyle="--", linewidth=1)
  for column in range(predicted.shape[0]):
    axes.plot(
      predicted[column],
      observed[column],
      marker="o",
      markersize=3,
      linewidth=1,
      label=f"year {column + 1}",
    )
  axes.set(
    xlabel="mean predicted risk",
    ylabel="observed risk (Kaplan-Meier)",
    xlim=(0, limit),
    ylim=(0, limit),
    title="Calibration by risk bin",
  )
  axes.legend(loc="upper left", fontsize=8)
  return Path(save_png(figure, path))


def write_risk_report(
  out_dir: str | os.PathLike,
  report: dict[str, Any],
  probs: Any,
  years_to_cancer: Any,
  years_to_followup: Any,
  num_bins: int = 10,
) -> dict[str, Path]:
  """Writes ``report.json`` (atomically), ``roc_per_year.png`` and ``calibration.png``.

  Args:
    out_dir: folder, created if missing.
    report: the dict of ``risk_report.risk_report`` (any JSON-serialisable dict).
    probs, years_to_cancer, years_to_followup: the arrays the report was computed from.
    num_bins: calibration bins (fewer when there are fewer exams).

  Returns:
    ``{"report": ..., "roc": ..., "calibration": ...}`` paths.
  """
  out_dir = Path(out_dir)
  text = json.dumps(report, indent=2, allow_nan=False)
  out_dir.mkdir(parents=True, exist_ok=True)
  with atomic_write(out_dir / "report.json") as f:
    f.write(text + "\n")
  paths = {"report": out_dir / "report.json"}
  paths["roc"] = plot_roc_per_year(
    out_dir / "roc_per_year.png", probs, years_to_cancer, years_to_followup
  )
  arrays = calibration.calibration_by_bin(
    probs, years_to_cancer, years_to_followup, min(num_bins, np.shape(probs)[0])
  )
  paths["calibration"] = plot_calibration(out_dir / "calibration.png", arrays)
  return paths
