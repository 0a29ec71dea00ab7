"""Evaluate a trained checkpoint on a dataset split and write a report with plots.

  python -m mammojax.evaluate --workdir=/tmp/imgfeatalign --split=test
  python -m mammojax.evaluate --workdir=RUN --checkpoint=latest --split=val \\
      --config.data.dir=/data/other_site --out=RUN/eval_other_site

Uses the run's own config (WORKDIR/config.json) unless --config is given; --config.x=y overrides
either. For risk models the report has the C-index and per-year AUCs with bootstrap 95% CIs,
per-subgroup metrics, ROC curves per year and a calibration plot.

Classifiers with a decision threshold (``eval.threshold``, e.g. FPN-MIL) take ``--threshold``: a
number, or ``youden:SPLIT`` for the threshold maximising Youden's J on another split of the same
checkpoint, so a threshold chosen on validation is applied to the test split:

  python -m mammojax.evaluate --workdir=/tmp/fpn_mil --split=test --threshold=youden:val

The report says which threshold it used and where it came from.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from mammojax.console import run_program
from mammojax.runs.config_files import load_run_config
from mammojax.runs.restore import restore_run
from mammojax.train import evaluation
from mammojax.train.task import Task

YOUDEN_PREFIX = "youden:"


def parse_threshold(spec: str) -> float | str:
  """``--threshold``: a number, or the split ``youden:SPLIT`` names."""
  if spec.startswith(YOUDEN_PREFIX) and len(spec) > len(YOUDEN_PREFIX):
    return spec[len(YOUDEN_PREFIX) :]
  try:
    return float(spec)
  except ValueError:
    raise ValueError(
      f"--threshold must be a number or {YOUDEN_PREFIX}SPLIT (e.g. "
      f"{YOUDEN_PREFIX}val), got {spec!r}"
    ) from None


def youden_threshold_of(task: Task, predictions: dict, split: str) -> float:
  """The ``youden_threshold`` the task's evaluation reports for one split's predictions."""
  value = task.evaluate(predictions).get("youden_threshold")
  if value is None:
    raise ValueError(
      f"task {task.config.task!r} reports no youden_threshold; pass a number as --threshold"
    )
  if not math.isfinite(value):
    raise ValueError(
      f"the {split} split has labels of one class only, so it has no Youden "
      "threshold; choose another split or pass a number as --threshold"
    )
  return value


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  workdir: str,
  which: str,
  split: str,
  out_dir: str,
  threshold: str | None = None,
) -> dict:
  """Restores the ``best`` or ``latest`` state of a run and writes the task's report.

  ``threshold`` (see :func:`parse_threshold`) replaces ``eval.threshold`` of a copy of ``config``
  and records its origin in ``eval.threshold_source``, both read by the task's report.
  """
  requested = parse_threshold(threshold) if threshold else None
  if requested is not None:
    if "threshold" not in config.eval:
      raise ValueError(f"--threshold: task {config.task!r} has no eval.threshold to set")
    config = config.copy_and_resolve_references()
  run = restore_run(workdir, config, which, example_split=split)
  task, state, step = run.task, run.state, run.step
  examples = task.dataset(split)
  predict = run.built.predict_step()

  def predictions_of(split_examples):
    return evaluation.collect_predictions(
      predict, state, split_examples, config.eval.batch_size, run.built.batch_sharding
    )

  if isinstance(requested, str):
    config.eval.threshold = youden_threshold_of(
      task, predictions_of(task.dataset(requested)), requested
    )
    config.eval.threshold_source = (
      f"maximises Youden's J on the {requested} split ({which} checkpoint, step {step})"
    )
  elif requested is not None:
    config.eval.threshold, config.eval.threshold_source = requested, "--threshold"
  # The task reads eval.threshold (and threshold_source) from this config when it reports.
  predictions = predictions_of(examples)
  report = task.write_report(predictions, out_dir, examples) if jax.process_index() == 0 else {}
  logging.getLogger("mammojax").info(
    "evaluated %s step %d on %s (%d examples): %s", run.source, step, split, len(examples), out_dir
  )
  return {"step": step, "split": split, "report": report, "checkpoint": run.source}


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  config = f.config or load_run_config(f.workdir)
  out_dir = f.out or os.path.join(f.workdir, f"eval_{f.split}")
  result = evaluate_checkpoint(config, f.workdir, f.checkpoint, f.split, out_dir, f.threshold)
  print(
    json.dumps(
      {
        "step": result["step"],
        "split": result["split"],
        "checkpoint": result["checkpoint"],
        "out": out_dir,
      }
    )
  )


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so importing this module for
  :func:`evaluate_checkpoint` does not clash with other tools' flags)."""
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  config_flags.DEFINE_config_file(
    "config", None, "Config file (default: WORKDIR/config.json of the run).", lock_config=False
  )
  flags.DEFINE_enum(
    "checkpoint", "best", ["best", "latest"], "Which checkpoint of the run to evaluate."
  )
  flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
  flags.DEFINE_string("out", None, "Report directory (default WORKDIR/eval_<split>).")
  flags.DEFINE_string(
    "threshold",
    None,
    "Decision threshold of a classifier's report: a number, or "
    f"{YOUDEN_PREFIX}SPLIT for the one maximising Youden's J on SPLIT (e.g. "
    f"{YOUDEN_PREFIX}val). Default: the config's eval.threshold.",
  )
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  run_program(main, define_flags)
