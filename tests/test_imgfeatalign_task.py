"""The shipped ImgFeatAlign config end to end: main job, evaluation report, sharding, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from shipped_configs import ROOT, smoke_config, smoke_training_run

from mammojax import tasks
from mammojax.evaluate import evaluate_checkpoint
from mammojax.train import trainer
from mammojax.train.metric_writer import read_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  config, workdir, summary, _ = smoke_training_run("imgfeatalign", tmp_path_factory)
  return config, workdir, summary


def test_smoke_run_logs_risk_metrics(smoke_run):
  config, workdir, summary = smoke_run
  assert summary["step"] == config.train.steps
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval/c_index" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for k in range(1, config.data.num_years + 1):
    assert f"eval/auc_year{k}" in evals[-1]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == config.train.steps and all(np.isfinite(losses))
  assert os.path.isdir(os.path.join(workdir, "best"))


def test_evaluate_writes_report_and_plots(smoke_run, tmp_path):
  config, workdir, _ = smoke_run
  out = str(tmp_path / "report")
  result = evaluate_checkpoint(config, workdir, "latest", "test", out)
  assert result["step"] == config.train.steps
  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f)
  assert "c_index" in report and "auc_year" in report
  for name in ("roc_per_year.png", "calibration.png"):
    assert os.path.getsize(os.path.join(out, name)) > 1000


def test_smoke_loss_same_on_one_and_eight_devices(tmp_path):
  losses = {}
  for shape in [(1, 1, 1), (4, 2, 1)]:
    config = smoke_config("imgfeatalign", tmp_path)
    config.mesh.shape = shape
    config.train.steps = 3
    workdir = str(tmp_path / f"mesh{shape[0]}")
    trainer.train_and_evaluate(config, workdir, tasks.build_task(config), show_progress=False)
    losses[shape] = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
  np.testing.assert_allclose(losses[(4, 2, 1)], losses[(1, 1, 1)], rtol=2e-5)


def _main(*args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", "mammojax.main", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )


def test_mistyped_override_names_the_key(tmp_path):
  result = _main(
    "--config=configs/imgfeatalign.py:smoke", f"--workdir={tmp_path}", "--config.train.stepz=3"
  )
  assert result.returncode != 0
  assert "stepz" in result.stderr


def test_ill_typed_override_names_the_key(tmp_path):
  result = _main(
    "--config=configs/imgfeatalign.py:smoke", f"--workdir={tmp_path}", "--config.train.steps=many"
  )
  assert result.returncode != 0
  assert "train.steps" in result.stderr


def test_unknown_variant_is_rejected(tmp_path):
  result = _main("--config=configs/imgfeatalign.py:bogus", f"--workdir={tmp_path}")
  assert result.returncode != 0
  assert "bogus" in result.stderr


def test_help_lists_flags():
  result = _main("--help")  # absl prints the help and exits with status 1
  for flag in ("--config", "--workdir", "--coordinator_address"):
    assert flag in result.stdout


def test_pretraining_stage_trains_once_and_links(tmp_path, monkeypatch):
  from mammojax.runs import stages

  config = smoke_config("imgfeatalign", tmp_path)
  workdir = str(tmp_path / "run")
  calls = []
  original = stages.train_and_evaluate

  def counting(stage_config, stage_dir, task, **kwargs):
    stage_config.data.synthetic.root = str(tmp_path / "data")
    calls.append(stage_dir)
    return original(stage_config, stage_dir, task, **kwargs)

  monkeypatch.setattr(stages, "train_and_evaluate", counting)
  stages.run_pretraining(config, workdir, show_progress=False)
  registration_dir = os.path.join(workdir, "registration")
  assert config.model.registration_checkpoint == registration_dir
  assert calls == [registration_dir]
  assert os.path.isdir(os.path.join(registration_dir, "checkpoints"))
  # A rerun (e.g. a resumed job) reuses the finished stage instead of training it again.
  again = smoke_config("imgfeatalign", tmp_path)
  stages.run_pretraining(again, workdir, show_progress=False)
  assert calls == [registration_dir]
  assert again.model.registration_checkpoint == registration_dir
  # The ImgFeatAlign task loads that run's MammoRegNet as its frozen registration network.
  task = tasks.build_task(again)
  assert task.pretrained_checkpoints() == {"registration": registration_dir}
