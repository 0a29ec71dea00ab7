r"""Repeated experiments: several configs over several seeds, test metrics as mean +- std.

  # the Temporal-GradCam table: six models, five seeds, each seed re-drawing the patient split
  python -m mammojax.sweep --workdir=/tmp/temporal_sweep

  # your own arms, a fixed split, three seeds, an override for every arm
  python -m mammojax.sweep --workdir=DIR --num_seeds=3 --fixed_split \
      --arm='GRU=configs/temporal.py:resnet,gru' --arm='DNN=configs/temporal.py:resnet,dnn' \
      --override=data.dir=/data/oasis_seq

Seeds are the reference's: ``numpy.random.RandomState(master_seed).randint(1000, size=N)``
(master seed 7 gives 175, 196, 537, 502, 579), or ``--seeds``. Each run sets ``config.seed`` and,
unless ``--fixed_split``, ``data.split_seed`` to its seed. Runs live in
``WORKDIR/<arm>/seed_<s>``; pretraining stages of the configs (e.g. the backbone) run once in
WORKDIR and are shared, and so are extracted features. A run whose ``test.json`` exists is not
redone, so a killed sweep resumes where it stopped. Each run is evaluated once on ``--split``
from its best checkpoint. Writes ``WORKDIR/results.json`` and ``WORKDIR/results.md`` (one row per
arm: mean +- sample std over seeds of every metric in ``--metrics``) and prints the table.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
from absl import flags

from mammojax import tasks
from mammojax.atomic_files import atomic_write, write_json_atomic
from mammojax.console import run_program
from mammojax.evaluate import evaluate_checkpoint
from mammojax.runs.config_files import load_config_file, set_config_field
from mammojax.runs.stages import run_pretraining
from mammojax.train.trainer import train_and_evaluate

log = logging.getLogger("mammojax")

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The seed's table: image models and their "seq 3" temporal versions, plus two sequence models
# that see the time gaps.
DEFAULT_ARMS = (
  "ResNet=configs/temporal.py:resnet,image",
  "ResNet (seq 3)=configs/temporal.py:resnet,dnn",
  "ViT=configs/temporal.py:vit,image",
  "ViT (seq 3)=configs/temporal.py:vit,dnn",
  "GRU=configs/temporal.py:resnet,gru",
  "Transformer=configs/temporal.py:resnet,transformer",
)
DEFAULT_METRICS = ("loss", "accuracy", "f1", "auc")


def reference_seeds(count: int, master_seed: int = 7) -> list[int]:
  """The reference's per-iteration seeds (run.py: ``np.random.randint(1e3, size=count)`` after
  seeding numpy with the master seed)."""
  return [int(s) for s in np.random.RandomState(master_seed).randint(1000, size=count)]


def parse_arm(text: str) -> tuple[str, str, str]:
  """``'LABEL=path.py[:variant]'`` -> (label, path, variant)."""
  label, sep, spec = text.partition("=")
  if not sep or not label or not spec:
    raise ValueError(f"--arm {text!r}: expected LABEL=configs/file.py[:variant]")
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(os.path.dirname(_CONFIGS), path)
  if not os.path.exists(path):
    raise ValueError(f"--arm {text!r}: config file {path} does not exist")
  return label, path, variant


def arm_directory(label: str) -> str:
  """A directory name for an arm label ('ResNet (seq 3)' -> 'ResNet_seq_3')."""
  cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
  return "_".join(part for part in cleaned.split("_") if part)


def run_sweep(
  workdir: str,
  arms: Sequence[str],
  seeds: Sequence[int],
  *,
  fixed_split: bool = False,
  overrides: Sequence[str] = (),
  split: str = "test",
  metrics: Sequence[str] = DEFAULT_METRICS,
  show_progress: bool = True,
) -> dict:
  """Trains and evaluates every (arm, seed); returns the aggregated results (module docstring)."""
  parsed = [parse_arm(a) for a in arms]
  labels = [label for label, _, _ in parsed]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--arm labels must be distinct, got {labels}")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be distinct, got {list(seeds)}")
  results = {"split": split, "seeds": list(seeds), "fixed_split": fixed_split, "arms": {}}
  for label, path, variant in parsed:
    runs = {}
    for seed in seeds:
      config = load_config_file(path, variant)
      for override in overrides:
        field, _, value = override.partition("=")
        set_config_field(config, field, _literal(value), what="--override")
      config.seed = int(seed)
      if not fixed_split:
        set_config_field(config, "data.split_seed", int(seed), what="--fixed_split")
      run_pretraining(config, workdir, show_progress=show_progress)
      run_dir = os.path.join(workdir, arm_directory(label), f"seed_{seed}")
      runs[str(seed)] = _run_once(config, run_dir, split, show_progress)
      log.info("%s seed %d: %s", label, seed, _short(runs[str(seed)]["metrics"], metrics))
    results["arms"][label] = {
      "config": f"{path}:{variant}" if variant else path,
      "runs": runs,
      "summary": summarize_runs([r["metrics"] for r in runs.values()], metrics),
    }
  write_json_atomic(os.path.join(workdir, "results.json"), results, indent=2, default=float)
  with atomic_write(os.path.join(workdir, "results.md")) as f:
    f.write(markdown_table(results, metrics))
  return results


def _run_once(config, run_dir: str, split: str, show_progress: bool) -> dict:
  """Trains (or resumes) one run and evaluates its best checkpoint once; reuses a finished one."""
  done = os.path.join(run_dir, f"{split}.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  train_and_evaluate(config, run_dir, tasks.build_task(config), show_progress=show_progress)
  evaluated = evaluate_checkpoint(
    config, run_dir, "best", split, os.path.join(run_dir, f"eval_{split}")
  )
  result = {"step": int(evaluated["step"]), "metrics": evaluated["report"]}
  write_json_atomic(done, result, indent=2, default=float)
  return result


def summarize_runs(reports: Sequence[dict], metrics: Sequence[str]) -> dict:
  """``{metric: {'mean', 'std', 'n'}}`` over runs (sample std, ddof 1; NaN values skipped)."""
  out = {}
  for name in metrics:
    values = [float(r[name]) for r in reports if name in r and np.isfinite(float(r[name]))]
    out[name] = {
      "mean": float(np.mean(values)) if values else math.nan,
      "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
      "n": len(values),
    }
  return out


def markdown_table(results: dict, metrics: Sequence[str]) -> str:
  """One row per arm: mean +- std of each metric over the seeds."""
  lines = [
    f"Split {results['split']!r}, seeds {results['seeds']}"
    + (" (fixed split)" if results["fixed_split"] else " (split re-drawn per seed)"),
    "",
    "| model | " + " | ".join(metrics) + " |",
    "|---|" + "---|" * len(metrics),
  ]
  for label, arm in results["arms"].items():
    cells = []
    for name in metrics:
      s = arm["summary"][name]
      cells.append(f"{s['mean']:.4f} +- {s['std']:.4f}" if s["n"] else "n/a")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _short(metrics: dict, names: Sequence[str]) -> str:
  return ", ".join(f"{n}={metrics[n]:.4f}" for n in names if n in metrics)


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (the global flags when run as a program)."""
  define = {"flag_values": values}
  flags.DEFINE_string("workdir", None, "Directory for all runs and the results.", **define)
  flags.DEFINE_multi_string(
    "arm",
    list(DEFAULT_ARMS),
    "LABEL=configs/file.py[:variant]; repeat for several (default: the seed's six models).",
    **define,
  )
  flags.DEFINE_integer("num_seeds", 5, "Seeds per arm (the reference's draw).", **define)
  flags.DEFINE_integer("master_seed", 7, "Seed of the reference's per-run seed draw.", **define)
  flags.DEFINE_list("seeds", [], "Explicit seeds (instead of --num_seeds/--master_seed).", **define)
  flags.DEFINE_bool(
    "fixed_split",
    False,
    "Keep the dataset's stored split instead of re-drawing per seed.",
    **define,
  )
  flags.DEFINE_multi_string(
    "override", [], "FIELD=VALUE set in every arm's config, e.g. data.dir=/data/x.", **define
  )
  flags.DEFINE_string("split", "test", "Split every run is evaluated on, once.", **define)
  flags.DEFINE_list("metrics", list(DEFAULT_METRICS), "Report metrics in the table.", **define)
  flags.mark_flag_as_required("workdir", flag_values=values)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    seeds = [int(s) for s in f.seeds] if f.seeds else reference_seeds(f.num_seeds, f.master_seed)
  except ValueError:
    raise ValueError(f"--seeds must be integers, got {f.seeds}") from None
  results = run_sweep(
    f.workdir,
    f.arm,
    seeds,
    fixed_split=f.fixed_split,
    overrides=f.override,
    split=f.split,
    metrics=f.metrics,
  )
  print(markdown_table(results, f.metrics), end="")


if __name__ == "__main__":
  run_program(main, define_flags)
