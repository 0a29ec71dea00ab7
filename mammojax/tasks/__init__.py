"""The tasks ``config.task`` can name. Each module is imported only when its task is used."""

from __future__ import annotations

import importlib

import ml_collections

from mammojax.train.task import Task

# config.task -> "module:class"
TASKS = {
    "imgfeatalign": "mammojax.tasks.imgfeatalign:ImgFeatAlignTask",
    "mammoregnet": "mammojax.tasks.mammoregnet:MammoRegNetTask",
}


def build_task(config: ml_collections.ConfigDict) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not a known task; choose one of "
                     f"{sorted(TASKS)}")
  module_name, class_name = TASKS[config.task].split(":")
  return getattr(importlib.import_module(module_name), class_name)(config)
