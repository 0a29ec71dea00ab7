"""The generic trainer: sharding invariance, resume, NaN detection, checkpoints, compile-once."""

import os
import shutil

import chex
import jax
import numpy as np
import pytest
from minimal_task import TinyTask, tiny_config

from mammojax.train import build as build_lib
from mammojax.train import init_state, trainer
from mammojax.train import step as step_lib
from mammojax.train.checkpoint import restore_state_only
from mammojax.train.metric_writer import read_metrics


def _train_losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _run(tmp_path, name, config, **kwargs):
  workdir = str(tmp_path / name)
  summary = trainer.train_and_evaluate(
    config, workdir, TinyTask(config), show_progress=False, **kwargs
  )
  return workdir, summary


@pytest.fixture
def watch_train_state(monkeypatch):
  """``watch_train_state(record)`` calls ``record(created)`` with every result of
  ``init_state.create_train_state`` from then on, as it is created (before any step)."""

  def install(record):
    original = init_state.create_train_state

    def spy(*args, **kwargs):
      out = original(*args, **kwargs)
      record(out)
      return out

    monkeypatch.setattr(init_state, "create_train_state", spy)

  return install


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_loss_is_independent_of_device_count_and_param_sharding(tmp_path, mesh_shape):
  assert jax.device_count() == 8
  base = tiny_config()
  base.mesh.shape = (1, 1, 1)
  single, _ = _run(tmp_path, "single", base)
  sharded_config = tiny_config()
  sharded_config.mesh.shape = mesh_shape
  sharded, _ = _run(tmp_path, "sharded", sharded_config)
  expected, got = _train_losses(single), _train_losses(sharded)
  assert sorted(expected) == list(range(1, 7))
  for step in expected:
    np.testing.assert_allclose(got[step], expected[step], rtol=1e-5)


def test_fsdp_shards_parameters(tmp_path, watch_train_state):
  config = tiny_config()
  config.mesh.shape = (4, 2, 1)
  seen = {}

  def record(out):
    seen["kernel"] = out.state.params["dense1"]["kernel"].sharding.spec
    seen["mu"] = out.state.opt_state

  watch_train_state(record)
  _run(tmp_path, "fsdp", config)
  # dense1 kernel is ('embed', 'mlp') = (8, 16): embed -> fsdp, mlp -> model (size 1).
  assert seen["kernel"][0] == "fsdp"


def test_resume_matches_uninterrupted_run(tmp_path):
  config = tiny_config()
  config.checkpoint.every_steps = 100  # only the slice boundary and the end save
  config.data.noise = 0.3  # a random augmentation must be replayed identically after resume
  straight, _ = _run(tmp_path, "straight", config)
  sliced = str(tmp_path / "sliced")
  first = trainer.train_and_evaluate(
    config, sliced, TinyTask(config), show_progress=False, stop_after=4
  )
  assert first["stopped"] == "slice" and first["step"] == 4
  second = trainer.train_and_evaluate(config, sliced, TinyTask(config), show_progress=False)
  assert second["step"] == 6
  expected, got = _train_losses(straight), _train_losses(sliced)
  assert sorted(got) == sorted(expected)
  for step in expected:
    # Same data order and same state: the losses agree step for step.
    np.testing.assert_allclose(got[step], expected[step], rtol=1e-6)


def test_nan_loss_names_the_step(tmp_path):
  config = tiny_config()
  config.data.nan_at = 5
  config.data.num_examples = 8  # every batch holds the NaN example
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 0"):
    _run(tmp_path, "nan", config)
  # Nothing was saved from the diverged state.
  assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "1")


def test_train_step_compiles_once(tmp_path, monkeypatch):
  original = step_lib.make_train_step

  def traced_once(*args, **kwargs):
    return chex.assert_max_traces(original(*args, **kwargs), n=1)

  monkeypatch.setattr(build_lib, "make_train_step", traced_once)
  config = tiny_config()
  config.train.steps = 5
  _, summary = _run(tmp_path, "traces", config)
  assert summary["step"] == 5


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
  config = tiny_config()
  workdir, _ = _run(tmp_path, "corrupt", config)
  step_dir = os.path.join(workdir, "checkpoints", "6", "state")
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  config.train.steps = 8
  with pytest.raises(RuntimeError, match=r"checkpoint .*checkpoints/6 is damaged or incomplete"):
    trainer.train_and_evaluate(config, workdir, TinyTask(config), show_progress=False)


def test_missing_checkpoint_directory_is_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    restore_state_only(str(tmp_path / "nowhere"), None)


def test_interrupted_save_leaves_no_finished_step(tmp_path):
  config = tiny_config()
  workdir, _ = _run(tmp_path, "partial", config)
  # A save that died midway leaves only a temporary directory, which resume ignores.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(ckpt_dir, "6"), os.path.join(ckpt_dir, "9.orbax-checkpoint-tmp"))
  config.train.steps = 7
  summary = trainer.train_and_evaluate(config, workdir, TinyTask(config), show_progress=False)
  assert summary["step"] == 7


def test_early_stopping_and_best_checkpoint(tmp_path):
  config = tiny_config()
  config.train.steps = 30
  config.eval.every_steps = 1
  config.eval.early_stopping_patience = 2
  config.optim.learning_rate = 0.0  # nothing improves after the first evaluation
  config.optim.schedule = "constant"
  config.checkpoint.best_metric = "eval/accuracy"
  workdir, summary = _run(tmp_path, "early", config)
  assert summary["stopped"] == "early_stopping"
  assert summary["step"] == 3
  assert summary["best"]["step"] == 1
  assert os.path.isdir(os.path.join(workdir, "best", "1"))


def test_frozen_parameters_do_not_move(tmp_path, watch_train_state):
  config = tiny_config()
  config.train.freeze = ["dense1/.*"]
  states = {}
  watch_train_state(lambda out: states.update(init=jax.device_get(out.state.params)))
  workdir, _ = _run(tmp_path, "frozen", config)
  abstract = jax.tree.map(np.asarray, states["init"])
  restored = jax.device_get(jax.tree.map(lambda x: x, _restore_params(workdir)))
  np.testing.assert_array_equal(restored["dense1"]["kernel"], abstract["dense1"]["kernel"])
  assert not np.allclose(restored["head"]["kernel"], abstract["head"]["kernel"])


def test_bad_freeze_pattern_is_reported(tmp_path):
  config = tiny_config()
  config.train.freeze = ["encoder/.*"]
  with pytest.raises(ValueError, match="matches no parameter"):
    _run(tmp_path, "badfreeze", config)


def test_metrics_jsonl_has_train_and_eval_rows(tmp_path):
  workdir, _ = _run(tmp_path, "metrics", tiny_config())
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(r["eval/count"] == 37 for r in evals)  # padding removed, every example once


def _restore_params(workdir):
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(
    os.path.join(workdir, "checkpoints"), item_names=("state",)
  ) as manager:
    restored = manager.restore(
      manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
  return restored["state"]["params"]


def test_bfloat16_compute_trains_with_float32_master_weights(tmp_path):
  config = tiny_config()
  config.train.compute_dtype = "bfloat16"
  workdir, summary = _run(tmp_path, "bf16", config)
  losses = _train_losses(workdir)
  assert all(np.isfinite(list(losses.values())))
  params = _restore_params(workdir)
  assert params["dense1"]["kernel"].dtype == np.float32
  # bf16 forward differs from float32 only by rounding.
  reference, _ = _run(tmp_path, "f32", tiny_config())
  np.testing.assert_allclose(losses[1], _train_losses(reference)[1], rtol=2e-2)


def test_reduce_on_plateau_lowers_the_update_scale(tmp_path):
  config = tiny_config()
  config.train.steps = 12
  config.optim.schedule = "constant"
  config.optim.learning_rate = 1e-6  # the loss stays flat: every window is a plateau
  config.optim.plateau.enabled = True
  config.optim.plateau.accumulation_steps = 2
  config.optim.plateau.patience = 1
  config.optim.plateau.factor = 0.5
  config.optim.plateau.rtol = 0.5
  workdir, _ = _run(tmp_path, "plateau", config)
  rows = [r for r in read_metrics(workdir) if "train/update_norm" in r]
  first, last = rows[1]["train/update_norm"], rows[-1]["train/update_norm"]
  assert last < 0.5 * first


def test_sigterm_saves_and_stops_then_resumes(tmp_path, monkeypatch):
  import signal

  original = trainer.evaluation.to_global
  calls = {"n": 0}

  def to_global_then_term(batch, sharding):
    # The 3rd batch put on devices is step 3's: SIGTERM arrives while that step runs.
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(batch, sharding)

  monkeypatch.setattr(trainer.evaluation, "to_global", to_global_then_term)
  config = tiny_config()
  config.checkpoint.every_steps = 100
  config.eval.every_steps = 100
  workdir, summary = _run(tmp_path, "term", config)
  assert summary["stopped"] == "preempted" and summary["step"] == 3
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  monkeypatch.setattr(trainer.evaluation, "to_global", original)
  _, resumed = _run(tmp_path, "term", config)
  assert resumed["step"] == 6 and resumed["stopped"] == "steps"


@pytest.mark.parametrize("source", ["converted", "run"])
def test_init_from_loads_converted_checkpoints_and_runs(tmp_path, watch_train_state, source):
  from mammojax.train.variable_store import save_variables

  trained_dir, _ = _run(tmp_path, "trained", tiny_config())
  trained = jax.tree.map(np.asarray, _restore_params(trained_dir))
  if source == "converted":
    init_dir = str(tmp_path / "converted")
    save_variables(init_dir, {"params": trained}, {"kind": "test"})
  else:
    init_dir = trained_dir
  seen = {}
  watch_train_state(lambda out: seen.update(params=jax.device_get(out.state.params)))
  config = tiny_config()
  config.init_from = init_dir
  config.train.steps = 1
  _run(tmp_path, "finetune", config)
  for name in ("dense1", "head"):
    np.testing.assert_array_equal(seen["params"][name]["kernel"], trained[name]["kernel"])


def test_init_from_with_wrong_shapes_names_the_parameter(tmp_path):
  from mammojax.train.variable_store import save_variables

  bad = str(tmp_path / "bad")
  save_variables(
    bad,
    {
      "params": {
        "dense1": {"kernel": np.zeros((3, 3)), "bias": np.zeros(16)},
        "bn": {"scale": np.ones(16), "bias": np.zeros(16)},
        "head": {"kernel": np.zeros((16, 1)), "bias": np.zeros(1)},
      }
    },
    {"kind": "test"},
  )
  config = tiny_config()
  config.init_from = bad
  with pytest.raises(ValueError, match=r"params/dense1/kernel has shape \(3, 3\)"):
    _run(tmp_path, "bad", config)
