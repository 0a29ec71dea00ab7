"""Runs an entry point with the tiny test task registered as ``config.task='tiny'``, so tests
can start real processes without the ImgFeatAlign compile cost:

  python tests/run_tiny_task.py mammojax.main --config=tests/tiny_task_config.py --workdir=DIR
  python tests/run_tiny_task.py benchmarks.train_step --config=tests/tiny_task_config.py

The first argument is the module to run as ``__main__``; the rest are its own arguments.
"""

import os
import runpy
import sys

from mammojax import tasks

# tests/ (this script's folder, already sys.path[0]) holds minimal_task; the repository root
# holds the benchmarks package.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
tasks.TASKS["tiny"] = "minimal_task:TinyTask"

if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(f"usage: {sys.argv[0]} MODULE [ARGS...]")
  module = sys.argv.pop(1)
  runpy.run_module(module, run_name="__main__", alter_sys=True)
