"""Evaluate a trained checkpoint on a dataset split and write a report with plots.

  python -m mammojax.evaluate --workdir=/tmp/imgfeatalign --split=test
  python -m mammojax.evaluate --workdir=RUN --checkpoint=latest --split=val \\
      --config.data.dir=/data/other_site --out=RUN/eval_other_site

Uses the run's own config (WORKDIR/config.json) unless --config is given; --config.x=y overrides
either. For risk models the report has the C-index and per-year AUCs with bootstrap 95% CIs,
per-subgroup metrics, ROC curves per year and a calibration plot.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from mammojax import tasks
from mammojax.console import setup_console_logging
from mammojax.data import pipeline
from mammojax.train import checkpoint, evaluation, init_state, sharding
from mammojax.train.step import make_predict_step
from mammojax.train.trainer import COMPUTE_DTYPES



def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: pass --config=configs/<experiment>.py")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str, split: str,
                        out_dir: str) -> dict:
  """Restores the ``best`` or ``latest`` state of a run and writes the task's report."""
  task = tasks.build_task(config)
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  examples = task.dataset(split)
  data_parallel = sharding.data_parallel_size(mesh)
  example_batch = next(pipeline.eval_batches(examples, global_batch_size=data_parallel,
                                             process_index=0, process_count=1))
  init = init_state.create_train_state(task, config, mesh, example_batch)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          init.state, init.shardings)
  directory = os.path.join(os.path.abspath(workdir), "best" if which == "best" else "checkpoints")
  state, step = checkpoint.restore_state_only(directory, abstract)
  predict = jax.jit(make_predict_step(task, COMPUTE_DTYPES[config.train.compute_dtype]),
                    in_shardings=(init.shardings, sharding.batch_sharding(mesh)))
  predictions = evaluation.collect_predictions(predict, state, examples, config.eval.batch_size,
                                               sharding.batch_sharding(mesh))
  report = task.write_report(predictions, out_dir) if jax.process_index() == 0 else {}
  logging.getLogger("mammojax").info("evaluated %s step %d on %s (%d examples): %s", which, step,
                                     split, len(examples), out_dir)
  return {"step": step, "split": split, "report": report}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  setup_console_logging()
  f = flags.FLAGS
  config = f.config or load_run_config(f.workdir)
  out_dir = f.out or os.path.join(f.workdir, f"eval_{f.split}")
  result = evaluate_checkpoint(config, f.workdir, f.checkpoint, f.split, out_dir)
  print(json.dumps({"step": result["step"], "split": result["split"], "out": out_dir}))


def define_flags() -> None:
  """Command-line flags, defined only when run as a program (so importing this module for
  :func:`evaluate_checkpoint` does not clash with other tools' flags)."""
  flags.DEFINE_string("workdir", None, "The training run's directory.")
  config_flags.DEFINE_config_file(
      "config", None, "Config file (default: WORKDIR/config.json of the run).", lock_config=False)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Which checkpoint of the run to evaluate.")
  flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
  flags.DEFINE_string("out", None, "Report directory (default WORKDIR/eval_<split>).")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  define_flags()
  app.run(main)
