"""The shipped ``configs/*.py`` for tests: loading them, and their ``:smoke`` variants trained on a
synthetic-data cache of the test's own."""

from __future__ import annotations

import os

import ml_collections

from mammojax import tasks
from mammojax.runs.config_files import load_config_file
from mammojax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
  """``get_config(variant)`` of ``configs/<name>.py``."""
  return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), variant)


def smoke_config(name: str, tmp_path) -> ml_collections.ConfigDict:
  """``configs/<name>.py:smoke`` with its synthetic data generated under ``tmp_path/data``."""
  config = shipped_config(name, "smoke")
  config.data.synthetic.root = str(tmp_path / "data")
  return config


def temporal_smoke_config(variant: str, root) -> ml_collections.ConfigDict:
  """``configs/temporal.py:<variant>,smoke`` with its synthetic cohort under ``root/data`` and
  features extracted into the run's own cache (no shared ``data.features_dir``)."""
  config = shipped_config("temporal", f"{variant},smoke" if variant else "smoke")
  config.data.synthetic.root = str(root / "data")
  config.data.features_dir = ""
  return config


def smoke_training_run(name: str, tmp_path_factory) -> tuple:
  """Trains ``configs/<name>.py:smoke`` in a new temporary directory (for a module fixture).

  Returns:
    ``(config, workdir, summary, tmp_path)``: the workdir is ``tmp_path/run`` and the synthetic
    data is under ``tmp_path/data``.
  """
  tmp_path = tmp_path_factory.mktemp(name)
  config = smoke_config(name, tmp_path)
  workdir = str(tmp_path / "run")
  summary = trainer.train_and_evaluate(
    config, workdir, tasks.build_task(config), show_progress=False
  )
  return config, workdir, summary, tmp_path
