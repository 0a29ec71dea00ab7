"""Train and evaluate any mammojax experiment.

  python -m mammojax.main --config=configs/imgfeatalign.py --workdir=/tmp/run
  python -m mammojax.main --config=configs/imgfeatalign.py:smoke --workdir=/tmp/smoke \\
      --config.train.steps=20 --config.optim.learning_rate=3e-4

The job resumes from the newest checkpoint in --workdir. Metrics go to
WORKDIR/metrics.jsonl and WORKDIR/tensorboard. Several hosts: pass --coordinator_address,
--num_processes and --process_id (launch/ does it), or --distributed_auto on TPU pods/SLURM.
"""

from __future__ import annotations

import logging

import jax
from absl import flags

from mammojax import console, tasks
from mammojax.console import define_experiment_config, run_program
from mammojax.host_memory import keep_freed_host_memory
from mammojax.runs.stages import run_pretraining
from mammojax.train.trainer import train_and_evaluate

_CONFIG = define_experiment_config()
flags.adopt_module_key_flags(console)  # --help lists --config with this module's flags
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
  "distributed_auto",
  False,
  "Call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM).",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
  "keep_freed_host_memory",
  True,
  "Keep freed host memory in the process instead of returning "
  "it to the kernel (glibc), so XLA:CPU reuses its per-step buffers instead of page-faulting "
  "them in again every step (mammojax/host_memory.py; 1.7x on the ICON digits step).",
)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Joins a multi-process run when asked to; a single process needs nothing."""
  if _COORDINATOR.value:
    # CPU processes need a collectives backend; GPUs/TPUs ignore this setting. Querying the
    # backend here would initialise it before jax.distributed, which is not allowed.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED_AUTO.value:
    jax.distributed.initialize()


def main(argv: list[str]) -> None:
  if _KEEP_HOST_MEMORY.value:
    keep_freed_host_memory()  # before JAX starts its backend threads
  initialize_distributed()
  config = _CONFIG.value
  run_pretraining(config, _WORKDIR.value, show_progress=_PROGRESS.value)
  summary = train_and_evaluate(
    config, _WORKDIR.value, tasks.build_task(config), show_progress=_PROGRESS.value
  )
  logging.getLogger("mammojax").info("finished: %s", {k: summary[k] for k in ("step", "stopped")})


if __name__ == "__main__":
  run_program(main)
