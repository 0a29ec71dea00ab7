"""What a training run leaves in its workdir, read back: its config."""

from __future__ import annotations

import json
import os

import ml_collections


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in ``WORKDIR/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {workdir} is not a training run's workdir "
      "(or pass --config=configs/<experiment>.py)"
    )
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}); pass --config=configs/<experiment>.py"
    ) from None
