"""Config of the trainer's tiny test task (``tests/minimal_task.py``) for tests that start real
processes; run it through the driver that registers the task:

  python tests/run_tiny_task.py mammojax.main --config=tests/tiny_task_config.py --workdir=DIR
"""

import ml_collections
from minimal_task import tiny_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"tests/tiny_task_config.py has no variants (got {variant!r})")
  c = tiny_config()
  c.task = "tiny"
  return c
