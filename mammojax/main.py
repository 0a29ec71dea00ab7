"""Train and evaluate any mammojax experiment.

  python -m mammojax.main --config=configs/imgfeatalign.py --workdir=/tmp/run
  python -m mammojax.main --config=configs/imgfeatalign.py:smoke --workdir=/tmp/smoke \\
      --config.train.steps=20 --config.optim.learning_rate=3e-4

The job resumes from the newest checkpoint in --workdir. Metrics go to
WORKDIR/metrics.jsonl and WORKDIR/tensorboard. Several hosts: pass --coordinator_address,
--num_processes and --process_id (launch/ does it), or --distributed_auto on TPU pods/SLURM.

One job at a time holds a workdir (WORKDIR/.lock); a second one is refused with the first
one's pid and host. Exit codes: 0 when training finished (its steps or early stopping), 2 for a
config, data or checkpoint error or a workdir in use (one line on stderr, see
console.run_program; --verbose adds the traceback), 1 for any other failure, 143
(console.EXIT_PREEMPTED) when SIGTERM stopped the job after it saved its state: a scheduler that
requeues on that code resumes it with the same command.
"""

from __future__ import annotations

import logging

import jax
from absl import flags

from mammojax import console, tasks
from mammojax.console import define_experiment_config, run_program
from mammojax.host_memory import keep_freed_host_memory
from mammojax.runs.stages import run_pretraining
from mammojax.train import workdir_lock
from mammojax.train.trainer import Preemption, train_and_evaluate

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
  workdir = _WORKDIR.value
  log = logging.getLogger("mammojax")
  # The workdir stays locked from the first pretraining stage (each of which locks its own
  # WORKDIR/<stage> too) to the end of the main run; a SIGTERM in a stage stops the job. A
  # ConfigError or WorkdirInUseError ends the job with one line and exit code 2 (run_program).
  with workdir_lock.hold(workdir), Preemption() as preemption:
    run_pretraining(config, workdir, show_progress=_PROGRESS.value)
    if preemption.stop_requested():
      summary = {"step": None, "stopped": "preempted"}
    else:
      summary = train_and_evaluate(
        config, workdir, tasks.build_task(config), show_progress=_PROGRESS.value
      )
  if summary["stopped"] == "preempted":
    where = "during pretraining" if summary["step"] is None else f"at step {summary['step']}"
    log.warning(
      "preempted %s (SIGTERM); its state is saved in %s. Exiting with code %d so the scheduler "
      "requeues the job; the same command resumes it.",
      where,
      workdir,
      console.EXIT_PREEMPTED,
    )
    raise SystemExit(console.EXIT_PREEMPTED)
  log.info("finished: %s", {k: summary[k] for k in ("step", "stopped")})


if __name__ == "__main__":
  run_program(main)
