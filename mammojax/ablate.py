"""Train the same experiment once per value of one config field and compare held-out metrics.

  # the ImgFeatAlign alignment ablation: aligned vs identity flow, same seeds and data
  python -m mammojax.ablate --config=configs/imgfeatalign.py --workdir=/tmp/ablation \\
      --field=model.align --values=True,False

Every arm starts from the same seed and reads the same data; pretraining stages of the config
(e.g. the MammoRegNet that ImgFeatAlign uses) run once and are shared. Each arm is evaluated on
--split from its best checkpoint; prints one JSON object and writes it to WORKDIR/ablation.json.
"""

from __future__ import annotations

import ast
import copy
import json
import os

from absl import flags
from ml_collections import config_flags

from mammojax import tasks
from mammojax.atomic_files import atomic_write
from mammojax.console import run_program
from mammojax.evaluate import evaluate_checkpoint
from mammojax.runs.config_files import config_field, set_config_field
from mammojax.runs.stages import run_pretraining
from mammojax.train.trainer import train_and_evaluate


def summarize(report: dict) -> dict:
  """The headline numbers of a task report (risk reports: C-index and AUCs with CIs)."""
  if "c_index" not in report or not isinstance(report["c_index"], dict):
    return report
  keep = ("point", "low", "high")
  out = {"c_index": {k: report["c_index"].get(k) for k in keep}}
  for year, block in sorted(report.get("auc_year", {}).items()):
    out[f"auc_year{year}"] = {k: block.get(k) for k in keep}
  return out


def run_ablation(config, workdir: str, field: str, values: list, split: str) -> dict:
  run_pretraining(config, workdir)
  arms = {}
  for value in values:
    arm = copy.deepcopy(config)
    set_config_field(arm, field, value, what="--field")
    arm_dir = os.path.join(workdir, f"{field}={value}")
    train_and_evaluate(arm, arm_dir, tasks.build_task(arm))
    # "best" falls back to the newest step for a config that tracks no best metric.
    result = evaluate_checkpoint(
      arm, arm_dir, "best", split, os.path.join(arm_dir, f"eval_{split}")
    )
    arms[str(value)] = {"step": result["step"], **summarize(result["report"])}
  return {"field": field, "split": split, "arms": arms}


def parse_values(config, field: str, texts: list[str]) -> list:
  """``--values`` as Python literals for the config field ``field``.

  Raises:
    KeyError: ``field`` names no config field.
    ValueError: a value does not parse, naming it, the field and the field's current type.
  """
  owner, name = config_field(config, field, what="--field")
  current = owner[name]
  kind = type(current).__name__
  kind = f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
  values = []
  for text in texts:
    try:
      values.append(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      example = repr(current) if current is not None else "a Python literal such as 3 or 'gru'"
      raise ValueError(
        f"--values: {text!r} does not parse as a value of {field} ({kind}, now {current!r}); "
        f"give Python literals such as {example}, strings in quotes"
      ) from None
  return values


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  values = parse_values(f.config, f.field, f.values)
  result = run_ablation(f.config, f.workdir, f.field, values, f.split)
  text = json.dumps(result, indent=2)
  with atomic_write(os.path.join(f.workdir, "ablation.json")) as out:
    out.write(text)
  print(text)


def define_flags() -> None:
  """Command-line flags, defined only when run as a program."""
  config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:variant].", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for all arms (one subdirectory each).")
  flags.DEFINE_string("field", "model.align", "Dotted config field to vary.")
  flags.DEFINE_list("values", ["True", "False"], "Values of --field (Python literals).")
  flags.DEFINE_string("split", "test", "Held-out split to compare on.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  run_program(main, define_flags)
