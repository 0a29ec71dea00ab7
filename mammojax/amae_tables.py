"""Reproduce the AMAE paper's three tables on the embedded synthetic volumes.

  python -m mammojax.amae_tables --workdir=/tmp/amae_tables
  python -m mammojax.amae_tables --workdir=/tmp/amae_tables --size=smoke   # seconds: the wiring

Pretrains AMAE once (configs/amae.py: many unlabelled subjects) in WORKDIR/amae, fine-tunes the
seed's five models on the same few labelled subjects (configs/amae_unetr.py's data) in
WORKDIR/<model>, evaluates each best checkpoint on the test subjects with every contrast
(Table 1) and with the optional T2 withheld (Table 2: zeros and absent, as a missing contrast),
and compares the per-subject Dice of the seed's pairs by the two-sided paired Wilcoxon
signed-rank test (Table 3, for both settings). Writes WORKDIR/tables.json and WORKDIR/tables.md
(beside the seed's published values); a run that is already finished is reused, so the command
resumes where it stopped.

Mean Dice is over the test subjects whose ground truth has a lesion (a subject without one has no
Dice; the tables count them), with a percentile bootstrap 95% interval over subjects
(``--bootstrap`` resamples, ``--seed``).
"""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from mammojax.console import command_flags, refuse_positional, run_program

PROGRAM = "mammojax.amae_tables"
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The seed's models: (config file, variant before the size).
MODELS = {
  "UNet": ("unet3d.py", ""),
  "UNETR": ("amae_unetr.py", "unetr,scratch"),
  "Adaptive UNETR": ("amae_unetr.py", "adaptive,scratch"),
  "AMAE pretrain + Adaptive UNETR": ("amae_unetr.py", "adaptive"),
  "AMAE pretrain + UNETR": ("amae_unetr.py", "unetr"),
}
# The seed's Table 3, in its order.
TABLE3_PAIRS = (
  ("AMAE pretrain + Adaptive UNETR", "Adaptive UNETR"),
  ("AMAE pretrain + UNETR", "UNETR"),
  ("AMAE pretrain + Adaptive UNETR", "AMAE pretrain + UNETR"),
  ("Adaptive UNETR", "UNETR"),
)
# Mean Dice published by the seed (Table 1: all contrasts; Table 2: without T2).
PUBLISHED = {
  "all": {"UNet": 0.370, "UNETR": 0.576, "Adaptive UNETR": 0.561,
          "AMAE pretrain + Adaptive UNETR": 0.598, "AMAE pretrain + UNETR": 0.604},
  "without_T2": {"UNet": 0.343, "UNETR": 0.516, "Adaptive UNETR": 0.496,
                 "AMAE pretrain + Adaptive UNETR": 0.546, "AMAE pretrain + UNETR": 0.575},
}  # fmt: skip
SETTINGS = {"all": (), "without_T2": ("T2",)}
SIZES = ("default", "smoke")


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("workdir", None, "Folder of the runs and tables (resumed if it exists).",
                      flag_values=values)  # fmt: skip
  flags.DEFINE_enum("size", "default", SIZES, "default: CPU minutes per model; smoke: seconds.",
                    flag_values=values)  # fmt: skip
  flags.DEFINE_list("models", list(MODELS), "Which of the seed's models (default all five).",
                    flag_values=values)  # fmt: skip
  flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the mean Dice.",
                       flag_values=values)  # fmt: skip
  flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.", flag_values=values)
  flags.mark_flags_as_required(["workdir"], flag_values=values)


def model_config(name: str, size: str):
  """The config of model ``name`` at ``size``, on the fine-tuning data of configs/amae_unetr.py
  (the UNet's own config otherwise trains on more labelled subjects)."""
  from mammojax.runs.config_files import load_config_file  # pylint: disable=import-outside-toplevel

  path, variant = MODELS[name]
  size_part = "" if size == "default" else size
  config = load_config_file(
    os.path.join(CONFIGS, path), ",".join(p for p in (variant, size_part) if p)
  )
  reference = load_config_file(os.path.join(CONFIGS, "amae_unetr.py"), size_part)
  config.data = copy.deepcopy(reference.data)
  return config


def slug(name: str) -> str:
  return name.lower().replace(" + ", "_").replace(" ", "_")


def train_and_test(name: str, size: str, workdir: str) -> dict[str, list[float]]:
  """Trains model ``name`` (its pretraining stage first, shared in ``workdir/amae``) and returns
  the per-subject Dice of its best checkpoint on the test split per setting of
  :data:`SETTINGS`."""
  # pylint: disable=import-outside-toplevel
  from mammojax import tasks
  from mammojax.evaluate import evaluate_checkpoint
  from mammojax.runs.stages import finished_run, run_pretraining
  from mammojax.train.trainer import train_and_evaluate

  config = model_config(name, size)
  run_pretraining(config, workdir)  # trains workdir/amae once, links model.pretrained
  run_dir = os.path.join(workdir, slug(name))
  if not finished_run(run_dir):
    train_and_evaluate(config, run_dir, tasks.build_task(config))
  dice = {}
  for setting, dropped in SETTINGS.items():
    evaluated = copy.deepcopy(config)
    evaluated.data.drop_contrasts = dropped
    out = os.path.join(run_dir, f"eval_test_{setting}")
    evaluate_checkpoint(evaluated, run_dir, "best", "test", out)
    dice[setting] = _subject_dice(os.path.join(out, "subjects.csv"))
  return dice


def _subject_dice(path: str) -> list[float]:
  with open(path, newline="") as f:
    return [float(row["dice"]) for row in csv.DictReader(f) if row["class"] == "infarct"]


def mean_with_interval(values: Sequence[float], n_resamples: int, seed: int) -> dict[str, Any]:
  """Mean of the finite ``values`` and its percentile bootstrap 95% interval over subjects."""
  from mammojax.metrics.bootstrap import bootstrap_ci  # pylint: disable=import-outside-toplevel

  scores = np.asarray(values, np.float64)
  finite = scores[np.isfinite(scores)]
  out: dict[str, Any] = {"n": int(finite.size), "n_skipped": int(scores.size - finite.size)}
  if not finite.size:
    return {**out, "mean": float("nan"), "low": float("nan"), "high": float("nan")}
  ci = bootstrap_ci(
    lambda w: (w @ finite) / w.sum(axis=1), finite.size, n_resamples=n_resamples, seed=seed
  )
  return {**out, "mean": ci.point, "low": ci.low, "high": ci.high}


def tables(dice: dict[str, dict[str, list[float]]], n_resamples: int, seed: int) -> dict:
  """Tables 1 and 2 (mean Dice and interval per model and setting) and Table 3 (paired
  Wilcoxon of the seed's pairs, both settings) from per-subject Dice ``dice[model][setting]``."""
  from mammojax.metrics.segmentation import wilcoxon_paired  # pylint: disable=import-outside-toplevel

  out: dict[str, Any] = {"mean_dice": {}, "wilcoxon": {}}
  for setting in SETTINGS:
    out["mean_dice"][setting] = {
      name: {
        **mean_with_interval(per_setting[setting], n_resamples, seed),
        "published": PUBLISHED[setting][name],
      }
      for name, per_setting in dice.items()
    }
    out["wilcoxon"][setting] = [
      {"a": a, "b": b, **wilcoxon_paired(dice[a][setting], dice[b][setting])}
      for a, b in TABLE3_PAIRS
      if a in dice and b in dice
    ]
  return out


def markdown(result: dict) -> str:
  """tables.md: the three tables, ours beside the seed's."""
  lines = []
  titles = {"all": "all contrasts", "without_T2": "T2 withheld at test time"}
  for number, setting in ((1, "all"), (2, "without_T2")):
    lines += [f"## Table {number}: mean Dice, {titles[setting]}", ""]
    lines += ["| model | mean Dice | 95% CI | subjects (skipped) | seed |", "|---|---|---|---|---|"]
    for name, row in result["mean_dice"][setting].items():
      lines.append(
        f"| {name} | {row['mean']:.3f} | {row['low']:.3f}-{row['high']:.3f} | "
        f"{row['n']} ({row['n_skipped']}) | {row['published']:.3f} |"
      )
    lines.append("")
  for setting in SETTINGS:
    lines += [f"## Table 3: paired two-sided Wilcoxon signed-rank, {titles[setting]}", ""]
    lines += ["| comparison | p-value | mean difference | pairs |", "|---|---|---|---|"]
    for row in result["wilcoxon"][setting]:
      lines.append(
        f"| {row['a']} vs. {row['b']} | {row['p_value']:.3g} | {row['mean_difference']:+.3f} | "
        f"{row['n_pairs']} |"
      )
    lines.append("")
  return "\n".join(lines)


def run_from_flags(f: flags.FlagValues) -> dict[str, Any]:
  from mammojax.atomic_files import atomic_write, write_json_atomic  # pylint: disable=import-outside-toplevel

  unknown = [m for m in f.models if m not in MODELS]
  if unknown or not f.models:
    raise ValueError(f"--models: {unknown or 'none given'}; choose among {list(MODELS)}")
  if f.bootstrap < 1:
    raise ValueError(f"--bootstrap={f.bootstrap} must be at least 1")
  os.makedirs(f.workdir, exist_ok=True)
  dice = {name: train_and_test(name, f.size, f.workdir) for name in f.models}
  result = {"size": f.size, **tables(dice, f.bootstrap, f.seed)}
  write_json_atomic(os.path.join(f.workdir, "tables.json"), result, indent=2)
  with atomic_write(os.path.join(f.workdir, "tables.md"), "w") as out:
    out.write(markdown(result))
  print(json.dumps(result, indent=2))
  return result


def run(argv: Sequence[str]) -> dict[str, Any]:
  """The command in-process: ``run(["--workdir=DIR", "--size=smoke"])``."""
  values, positional = command_flags(define_flags, argv, PROGRAM)
  refuse_positional(positional)
  return run_from_flags(values)


def main(argv: list[str]) -> None:
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  run_program(main, define_flags)
