"""Runs that an experiment needs first, declared in its config.

``config.pretrain.<name> = {config: 'configs/X.py', variant: '', link: 'model.field'}`` trains
configs/X.py into ``WORKDIR/<name>`` (resuming it if it is already there) and points
``config.model.field`` at that run, unless the user already set ``model.field``. This is how the
default ImgFeatAlign job trains its frozen MammoRegNet before using it.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections

from mammojax import tasks
from mammojax.runs.config_files import config_field, load_config_file
from mammojax.train.trainer import train_and_evaluate

log = logging.getLogger("mammojax")


def run_pretraining(
  config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True
) -> None:
  """Trains every stage of ``config.pretrain`` whose link field is empty, then links it."""
  for name, stage in (config.get("pretrain") or {}).items():
    owner, field = config_field(config, stage.link, what="config.pretrain link")
    if owner[field]:
      continue
    stage_config = load_config_file(stage.config, stage.get("variant", ""))
    stage_dir = os.path.join(workdir, name)
    if finished_run(stage_dir):
      log.info("using the finished %s run in %s", name, stage_dir)
    else:
      log.info("pretraining %s (%s) in %s", name, stage.config, stage_dir)
      summary = train_and_evaluate(
        stage_config, stage_dir, tasks.build_task(stage_config), show_progress=show_progress
      )
      log.info("%s done: %s", name, summary.get("best") or summary.get("eval"))
    owner[field] = stage_dir


def finished_run(run_dir: str) -> bool:
  """A run that ended by reaching its steps or by early stopping (not one that was cut off)."""
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("stopped") in ("steps", "early_stopping")
