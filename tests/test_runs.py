"""mammojax.runs: restoring a training workdir or a converted checkpoint, and config fields."""

import jax
import ml_collections
import numpy as np
import pytest
from minimal_task import tiny_config

from mammojax.runs import config_files, restore
from mammojax.tasks import build_task
from mammojax.train import evaluation, trainer
from mammojax.train.variable_store import save_variables


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 6 steps that keeps every checkpoint and tracks no best step."""
  config = tiny_config()
  config.task = "minimal_task:TinyTask"
  config.checkpoint.every_steps = 2
  config.checkpoint.keep = 5
  workdir = str(tmp_path_factory.mktemp("runs") / "run")
  trainer.train_and_evaluate(config, workdir, build_task(config), show_progress=False)
  return config, workdir


def _params(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_restore_a_workdir_reads_its_config_and_newest_step(trained):
  config, workdir = trained
  run = restore.restore_run(workdir)
  assert run.step == config.train.steps and run.source.endswith("checkpoints")
  assert run.config.task == config.task and run.config.train.steps == config.train.steps
  earlier = restore.restore_run(workdir, checkpoint=2)
  assert earlier.step == 2
  moved = jax.tree.leaves(
    jax.tree.map(
      lambda a, b: np.abs(a - b).max(), _params(run.state.params), _params(earlier.state.params)
    )
  )
  assert max(moved) > 0  # six steps of training changed the parameters
  # The restored state runs: the task's evaluation of its validation split.
  predictions = evaluation.collect_predictions(
    run.built.predict_step(),
    run.state,
    run.task.dataset("val"),
    config.eval.batch_size,
    run.built.batch_sharding,
  )
  metrics = run.task.evaluate(predictions)
  assert metrics and all(np.isfinite(v) for v in metrics.values())
  assert run.data_manifest() is None  # the tiny task has no ingested data


def test_restore_a_converted_checkpoint_needs_the_config(trained, tmp_path):
  config, workdir = trained
  variables = restore.restore_run(workdir).variables
  converted = str(tmp_path / "converted")
  save_variables(converted, jax.device_get(variables), {"kind": "test"})
  with pytest.raises(ValueError, match="converted checkpoint .*--config"):
    restore.restore_run(converted)
  run = restore.restore_run(converted, config)
  assert run.step == 0 and "converted" in run.source
  for name in ("dense1", "head"):
    np.testing.assert_array_equal(
      np.asarray(run.state.params[name]["kernel"]), np.asarray(variables["params"][name]["kernel"])
    )


def test_restore_errors_name_the_path_and_the_fix(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(FileNotFoundError, match="not a directory"):
    restore.restore_run(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="best.*latest.*step number"):
    restore.restore_run(workdir, checkpoint="newest")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    config_files.load_run_config(str(tmp_path / "empty"))


def test_config_fields_by_dotted_path():
  config = ml_collections.ConfigDict({"model": {"align": True, "sizes": {"width": 4}}})
  config_files.set_config_field(config, "model.sizes.width", 8, what="--field")
  assert config.model.sizes.width == 8
  with pytest.raises(KeyError, match="--field 'model.nope.width'.*'model.nope' does not exist"):
    config_files.config_field(config, "model.nope.width", what="--field")
  with pytest.raises(KeyError, match="--field 'model.depth' names no config field"):
    config_files.set_config_field(config, "model.depth", 3, what="--field")
