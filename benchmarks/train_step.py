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
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags  # noqa: E402

from benchmarks import harness  # noqa: E402
from mammojax import tasks  # noqa: E402
from mammojax.data import pipeline  # noqa: E402
from mammojax.train import evaluation, init_state, optim, sharding  # noqa: E402
from mammojax.train.step import make_train_step  # noqa: E402
from mammojax.train.trainer import COMPUTE_DTYPES  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, optionally with a variant: configs/X.py:smoke. "
  "Override any field with --config.a.b=value.",
  lock_config=True,
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps before timing.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  harness.setup_host_memory()  # as python -m mammojax.main does
  config = _CONFIG.value
  task = tasks.build_task(config)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  batch_sharding = sharding.batch_sharding(mesh)
  data_parallel = sharding.data_parallel_size(mesh)
  if config.train.batch_size % data_parallel:
    raise app.UsageError(
      f"config.train.batch_size={config.train.batch_size} must be divisible by the "
      f"data-parallel mesh size {data_parallel} ({len(mesh.devices.flat)} devices, "
      f"config.mesh.shape={tuple(config.mesh.shape)})"
    )
  train_examples = task.dataset("train")
  host_batch = next(
    pipeline.train_iterator(
      train_examples,
      seed=config.seed,
      global_batch_size=config.train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  batch = evaluation.to_global(host_batch, batch_sharding)

  start = time.perf_counter()
  example_batch = next(
    pipeline.eval_batches(
      train_examples, global_batch_size=data_parallel, process_index=0, process_count=1
    )
  )
  init = init_state.create_train_state(task, config, mesh, example_batch)
  jax.block_until_ready(init.state)
  init_s = time.perf_counter() - start

  schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
  train_step = jax.jit(
    make_train_step(
      task,
      init.tx,
      init.trainable,
      jax.random.key(config.seed + 1, impl=config.rng_impl),
      COMPUTE_DTYPES[config.train.compute_dtype],
      schedule,
      optim.uses_loss_value(config),
    ),
    in_shardings=(init.shardings, batch_sharding),
    out_shardings=(init.shardings, NamedSharding(mesh, P())),
    donate_argnums=0,
  )
  compiled, compile_s = harness.compile_jax(train_step, init.state, batch)

  state = init.state

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
      "mesh": dict(mesh.shape),
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
