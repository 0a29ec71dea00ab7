r"""Paired comparison of two segmentation evaluations: ``python -m mammojax.compare``.

The seed's test between models: the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``)
on the per-subject scores of two runs evaluated on the same split, per foreground class, with the
median and mean paired difference (A - B). Subjects whose ground truth lacks the class have no
Dice (NaN) and are dropped from the pairs, and the output says how many:

  python -m mammojax.evaluate --workdir=/tmp/unetr --split=test
  python -m mammojax.evaluate --workdir=/tmp/unet3d --split=test
  python -m mammojax.compare --a=/tmp/unetr/eval_test --b=/tmp/unet3d/eval_test

``--a`` and ``--b`` are evaluate's report folders (``report.json`` and ``subjects.csv``); the rows
are paired by position, and only when both reports were made on the same ground truth (their
``truth_digest`` agree). ``--metric`` picks a column of ``subjects.csv`` (dice, hd95,
volume_difference_relative, ...). Prints one JSON object; ``--out=FILE`` also writes it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from mammojax.console import command_flags, refuse_positional, run_program

PROGRAM = "mammojax.compare"


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (the global flags when run as a program)."""
  define = {"flag_values": values}
  flags.DEFINE_string("a", None, "The first evaluate report folder (A).", **define)
  flags.DEFINE_string("b", None, "The second evaluate report folder (B).", **define)
  flags.DEFINE_string("metric", "dice", "The subjects.csv column to compare.", **define)
  flags.DEFINE_string("out", "", "Also write the result to this JSON file.", **define)
  flags.mark_flags_as_required(["a", "b"], flag_values=values)


def _read_report(folder: str, flag: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
  paths = [os.path.join(folder, name) for name in ("report.json", "subjects.csv")]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f"--{flag}: {missing[0]} does not exist (give a folder written by python -m "
      "mammojax.evaluate for a segmentation run)"
    )
  with open(paths[0]) as f:
    report = json.load(f)
  with open(paths[1], newline="") as f:
    rows = list(csv.DictReader(f))
  return report, rows


def compare(a: str, b: str, metric: str = "dice") -> dict[str, Any]:
  """The paired test of ``metric`` between the evaluate folders ``a`` and ``b``, per class."""
  from mammojax.metrics.segmentation import wilcoxon_paired  # pylint: disable=import-outside-toplevel

  report_a, rows_a = _read_report(a, "a")
  report_b, rows_b = _read_report(b, "b")
  digest_a, digest_b = report_a.get("truth_digest"), report_b.get("truth_digest")
  if not digest_a or digest_a != digest_b:
    raise ValueError(
      f"--a {a} and --b {b} were not evaluated on the same subjects (their truth_digest "
      "differ or are missing): evaluate both runs on the same split of the same data"
    )
  if rows_a and metric not in rows_a[0]:
    raise ValueError(f"--metric={metric!r}: subjects.csv has {sorted(rows_a[0])}")
  classes = sorted({r["class"] for r in rows_a})
  result: dict[str, Any] = {"a": a, "b": b, "metric": metric, "classes": {}}
  for name in classes:
    scores_a = [float(r[metric]) for r in rows_a if r["class"] == name]
    scores_b = [float(r[metric]) for r in rows_b if r["class"] == name]
    result["classes"][name] = {
      "mean_a": _nan_mean(scores_a),
      "mean_b": _nan_mean(scores_b),
      **wilcoxon_paired(scores_a, scores_b),
    }
  return result


def _nan_mean(values: Sequence[float]) -> float:
  finite = [v for v in values if v == v]
  return sum(finite) / len(finite) if finite else float("nan")


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  from mammojax.atomic_files import write_json_atomic  # pylint: disable=import-outside-toplevel

  result = compare(f.a, f.b, f.metric)
  if f.out:
    write_json_atomic(f.out, result, indent=2)
  print(json.dumps(result, indent=2))
  return result


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command in-process: ``run(["--a=RUN_A/eval_test", "--b=RUN_B/eval_test"])``."""
  values, positional = command_flags(define_flags, argv, PROGRAM)
  refuse_positional(positional)
  return run_from_flags(values)


def main(argv: list[str]) -> None:
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  run_program(main, define_flags)
