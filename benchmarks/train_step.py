"""Train-step speed of any experiment config: compile time, step time, examples/s, FLOPs, memory.

  python benchmarks/train_step.py --config=configs/imgfeatalign.py:smoke --steps=5
  python benchmarks/train_step.py --config=configs/imgfeatalign.py --config.train.batch_size=32

The task, the sharded train state and the jitted train step are built as the trainer builds
them, over the mesh ``config.mesh`` gives on this machine's devices. The step is compiled ahead
of time (``compile_s`` = lower + compile), then ``--steps`` steps are timed after ``--warmup``
untimed ones, on one fixed batch from the training pipeline: input time is excluded
(``benchmarks/pipeline.py`` measures that). ``flops`` and the ``*_bytes`` fields come from XLA's
cost and memory analyses of the compiled step: one device's share of the sharded program, so
``gflops_per_s`` is per device.
"""

from __future__ import annotations

import os
import sys
import time

if not __package__:  # Run as a script: make the repository root importable (benchmarks/).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import harness  # noqa: E402
from mammojax import (
  console,  # noqa: E402
  tasks,  # noqa: E402
)
from mammojax.console import define_experiment_config  # noqa: E402
from mammojax.data.pipelines import batching  # noqa: E402
from mammojax.train import evaluation  # noqa: E402
from mammojax.train.build import build  # noqa: E402

_CONFIG = define_experiment_config()
flags.adopt_module_key_flags(console)  # --help lists --config with this module's flags
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps before timing.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  harness.setup_host_memory()  # as python -m mammojax.main does
  config = _CONFIG.value
  task = tasks.build_task(config)
  start = time.perf_counter()
  try:
    built = build(task, config)
  except ValueError as e:  # e.g. a batch size the mesh cannot split
    raise app.UsageError(str(e)) from None
  jax.block_until_ready(built.state)
  init_s = time.perf_counter() - start
  host_batch = next(
    batching.train_iterator(
      task.dataset("train"),
      seed=config.seed,
      global_batch_size=config.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  batch = evaluation.to_global(host_batch, built.batch_sharding)
  train_step = built.train_step()
  compiled, compile_s = harness.compile_jax(train_step, built.state, batch)

  state = built.state

  def run_step() -> None:
    nonlocal state
    state, metrics = compiled(state, batch)  # The old state is donated: always rebind.
    jax.block_until_ready((state, metrics))

  stats = harness.compiled_stats(compiled)
  case = harness.Case(
    name=config.get("name", "train"),
    impl="jax",
    fn=run_step,
    compile_s=compile_s,
    extra={
      "batch_size": config.train.batch_size,
      "init_s": init_s,
      "mesh": dict(built.mesh.shape),
      "compute_dtype": config.train.compute_dtype,
      **stats,
    },
  )
  [result] = harness.time_cases([case], warmup=_WARMUP.value, repeats=_STEPS.value)
  result["examples_per_s"] = config.train.batch_size / (result["median_ms"] / 1e3)
  if "flops" in result:
    result["gflops_per_s"] = result["flops"] / (result["median_ms"] / 1e3) / 1e9
  harness.report(
    "train_step",
    [result],
    config=config_flags.get_config_filename(flags.FLAGS["config"]),
    overrides=config_flags.get_override_values(flags.FLAGS["config"]),
  )


if __name__ == "__main__":
  app.run(main)
