"""The tasks ``config.task`` can name. Each module is imported only when its task is used."""

from __future__ import annotations

import importlib

import ml_collections

from mammojax.train.task import Task

# config.task -> "module:class"
TASKS = {
  "amae": "mammojax.tasks.amae:MaskedAutoencoderTask",
  "fpn_mil": "mammojax.tasks.fpn_mil:FPNMILTask",
  "gradicon_unet": "mammojax.tasks.gradicon_unet:GradICONUNetTask",
  "icon_digits": "mammojax.tasks.icon_digits:IconDigitsTask",
  "image_classifier": "mammojax.tasks.temporal:ImageClassifierTask",
  "imgfeatalign": "mammojax.tasks.imgfeatalign:ImgFeatAlignTask",
  "mammoregnet": "mammojax.tasks.mammoregnet:MammoRegNetTask",
  "segmentation": "mammojax.tasks.segmentation:SegmentationTask",
  "temporal": "mammojax.tasks.temporal:TemporalFeatureTask",
  "temporal_end_to_end": "mammojax.tasks.temporal:EndToEndTemporalTask",
}


def build_task(config: ml_collections.ConfigDict) -> Task:
  """The task ``config.task`` names: a key of ``TASKS`` or a ``"module:Class"`` of your own."""
  spec = TASKS.get(config.task) or (config.task if ":" in config.task else None)
  if spec is None:
    raise ValueError(
      f"config.task={config.task!r} is not a known task; choose one of "
      f"{sorted(TASKS)} or give 'package.module:TaskClass'"
    )
  module_name, class_name = spec.split(":")
  return getattr(importlib.import_module(module_name), class_name)(config)
