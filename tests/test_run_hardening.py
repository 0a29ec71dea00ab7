"""Runs that a hostile user breaks: two jobs on one workdir, history after a kill and resume, the
best checkpoint across segments, config and data errors before the first step, NaN messages,
and SIGTERM's exit code."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import grain
import pytest
from minimal_task import TinyTask, tiny_config

from mammojax import console
from mammojax.train import trainer, workdir_lock
from mammojax.train.metric_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MAIN = (sys.executable, os.path.join(REPO, "tests", "run_tiny_task.py"), "mammojax.main")
HOLDER = (
  "import sys, time\n"
  "from mammojax.train import workdir_lock\n"
  "workdir_lock.acquire(sys.argv[1])\n"
  "print('locked', flush=True)\n"
  "time.sleep(120)\n"
)


def _train(config, workdir, task=None, **kwargs):
  task = task or TinyTask(config)
  return trainer.train_and_evaluate(config, str(workdir), task, show_progress=False, **kwargs)


def _start_holder(workdir):
  """A process that holds ``workdir``'s lock until it is killed."""
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "locked"
  return proc


def _is_unlocked(workdir) -> bool:
  fd = os.open(os.path.join(workdir, workdir_lock.LOCK_FILE), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)


# One job per workdir.


def test_second_job_is_refused_naming_the_first(tmp_path):
  workdir = tmp_path / "run"
  holder = _start_holder(workdir)
  try:
    with pytest.raises(
      workdir_lock.WorkdirInUseError,
      match=rf"{workdir} is in use by pid {holder.pid} on host {re.escape(socket.gethostname())}"
      r" since \S+; wait for it or use another --workdir",
    ):
      _train(tiny_config(), workdir)
  finally:
    holder.kill()
    holder.wait()
  assert sorted(os.listdir(workdir)) == [".lock"]  # nothing of the first job was touched


def test_stale_lock_of_a_dead_job_is_reported_and_taken_over(tmp_path, caplog):
  workdir = tmp_path / "run"
  holder = _start_holder(workdir)
  holder.kill()  # SIGKILL: no cleanup runs, the lock file still names it
  holder.wait()
  with open(workdir / ".lock") as f:
    started = json.load(f)["started"]
  caplog.set_level("INFO", logger="mammojax")
  with workdir_lock.hold(str(workdir)):
    with open(workdir / ".lock") as f:
      assert json.load(f)["pid"] == os.getpid()
  assert (
    f"a previous job (pid {holder.pid} on host {socket.gethostname()}, started {started}) "
    "ended without releasing"
  ) in caplog.text
  assert _is_unlocked(workdir) and os.path.getsize(workdir / ".lock") == 0  # released cleanly


def test_nested_and_reentrant_locks_then_released_on_error(tmp_path):
  workdir = tmp_path / "main"
  config = tiny_config()
  config.train.steps = 1
  with workdir_lock.hold(str(workdir)):  # what main holds around the stages and the main run
    assert _train(config, workdir / "stage")["step"] == 1
    assert _train(config, workdir)["step"] == 1
    assert not _is_unlocked(workdir)
  assert _is_unlocked(workdir) and _is_unlocked(workdir / "stage")
  with pytest.raises(trainer.ConfigError):
    _train(config, workdir, _EmptyValTask(config))
  assert _is_unlocked(workdir)


# History after a resume.


def _read_events(directory):
  """(file, event) for every event of every TensorBoard file, files in TensorBoard's order."""
  from tensorboardX.proto import event_pb2

  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      yield name, event


def _visible_scalars(directory, tag):
  """``{step: [values]}`` of ``tag`` as TensorBoard's EventAccumulator shows them: a
  ``SessionLog.START`` event purges every earlier event whose step is at least its own
  (``_CheckForRestartAndMaybePurge``, for files of ``file_version`` 2)."""
  from tensorboardX.proto import event_pb2

  seen = []
  for _, event in _read_events(directory):
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      seen = [(s, v) for s, v in seen if s < event.step]
    for value in event.summary.value:
      if value.tag == tag:
        seen.append((event.step, value.simple_value))
  steps = {}
  for step, value in seen:
    steps.setdefault(step, []).append(value)
  return steps


def test_resume_drops_history_logged_after_the_checkpoint(tmp_path):
  from tensorboardX import SummaryWriter

  config = tiny_config()
  config.checkpoint.every_steps = 100  # only the slice boundary and the end save
  config.logging.tensorboard = True
  workdir = tmp_path / "run"
  assert _train(config, workdir, stop_after=4)["step"] == 4
  # The killed job of the next segment logged steps 5 and 6 (and half a line) before dying.
  with open(workdir / "metrics.jsonl", "a") as f:
    for step in (5, 6):
      f.write(json.dumps({"step": step, "train/loss": 123.0}) + "\n")
    f.write(json.dumps({"step": 6, "eval/accuracy": 0.5}) + "\n")
    f.write('{"step": 7, "train/lo')
  killed = SummaryWriter(str(workdir / "tensorboard"), filename_suffix=f".{time.time_ns()}")
  for step in (5, 6):
    killed.add_scalar("train/loss", 123.0, step)
  killed.close()

  assert _train(config, workdir)["step"] == 6
  rows = read_metrics(workdir)
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [1, 2, 3, 4, 5, 6]  # strictly increasing, no duplicates
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]
  assert all(r["train/loss"] != 123.0 for r in rows if "train/loss" in r)
  visible = _visible_scalars(workdir / "tensorboard", "train/loss")
  assert sorted(visible) == [1, 2, 3, 4, 5, 6]
  assert all(len(v) == 1 and v[0] != 123.0 for v in visible.values())
  # The resumed segment's file is a version-2 file that opens with the restart marker at its
  # first step, before any scalar.
  last = sorted(os.listdir(workdir / "tensorboard"))[-1]
  events = [e for name, e in _read_events(workdir / "tensorboard") if name == last]
  assert events[0].file_version == "brain.Event:2"
  first_scalar = next(i for i, e in enumerate(events) if e.HasField("summary"))
  markers = [e for e in events[:first_scalar] if e.HasField("session_log")]
  assert [(m.session_log.status, m.step) for m in markers] == [(1, 5)]  # 1 = SessionLog.START


class _ScriptedScoreTask(TinyTask):
  """TinyTask whose evaluation also reports ``score``, taken in turn from ``scores``."""

  scores: list[float] = []

  def evaluate(self, predictions):
    return {**super().evaluate(predictions), "score": type(self).scores.pop(0)}


def _score_config(steps):
  config = tiny_config()
  config.train.steps = steps
  config.eval.every_steps = 1
  config.checkpoint.best_metric = "eval/score"
  return config


def test_best_and_early_stopping_continue_across_segments(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  config = _score_config(6)
  config.eval.early_stopping_patience = 3
  monkeypatch.setattr(_ScriptedScoreTask, "scores", [0.5, 0.9, 0.6, 0.7, 0.8, 0.85])
  first = _train(config, workdir, _ScriptedScoreTask(config), stop_after=3)
  assert first["best"]["step"] == 2 and first["stopped"] == "slice"
  second = _train(config, workdir, _ScriptedScoreTask(config))
  # Steps 3, 4 and 5 did not beat step 2's 0.9: patience 3 stops at step 5.
  assert second["stopped"] == "early_stopping" and second["step"] == 5
  assert second["best"]["step"] == 2 and second["best"]["eval/score"] == 0.9
  assert "eval/accuracy" in second["best"]  # the whole eval row of step 2, from metrics.jsonl
  assert os.listdir(workdir / "best") == ["2"]
  with open(workdir / "summary.json") as f:
    assert json.load(f)["best"]["step"] == 2


def test_best_saved_past_the_restored_step_is_replaced_by_a_better_one(tmp_path, monkeypatch):
  # A job saved best/4 and was killed before checkpoints/4. The resumed job (from step 2) finds
  # step 3 better still: best/ must then hold step 3 (orbax skips, without a word, a save at a
  # step before its newest one).
  workdir = tmp_path / "run"
  config = _score_config(4)
  config.checkpoint.every_steps = 2
  monkeypatch.setattr(_ScriptedScoreTask, "scores", [0.1, 0.2, 0.3, 0.9, 0.95, 0.4])
  _train(config, workdir, _ScriptedScoreTask(config))
  os.rename(workdir / "checkpoints" / "4", tmp_path / "gone")
  summary = _train(config, workdir, _ScriptedScoreTask(config))
  assert summary["best"]["step"] == 3 and summary["best"]["eval/score"] == 0.95
  assert os.listdir(workdir / "best") == ["3"]
  with open(workdir / "best" / "3" / "metrics" / "metrics") as f:
    assert json.load(f) == {"eval/score": 0.95}


# Checks before the first step.


@pytest.mark.parametrize(
  "field, value",
  [
    ("train.steps", -5),
    ("train.steps", 0),
    ("train.batch_size", 0),
    ("eval.batch_size", 0),
    ("eval.every_steps", 0),
  ],
)
def test_impossible_counts_are_refused_before_anything(tmp_path, field, value):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(
    trainer.ConfigError, match=rf"config\.{field} must be a positive integer, got {value}"
  ):
    _train(config, tmp_path / "run")
  assert not os.path.exists(tmp_path / "run")


class _EmptyValTask(TinyTask):
  """A task whose validation split has no shards (ArrayRecord refuses an empty path list)."""

  def __init__(self, config):
    super().__init__(config)
    self._data_dir = "/data/somewhere"

  def dataset(self, split):
    if split == "val":
      return grain.MapDataset.source(grain.sources.ArrayRecordDataSource([]))
    return super().dataset(split)


class _NoValExamplesTask(TinyTask):
  def dataset(self, split):
    return grain.MapDataset.source([]) if split == "val" else super().dataset(split)


@pytest.mark.parametrize("task_class", [_EmptyValTask, _NoValExamplesTask])
def test_empty_eval_split_is_refused_before_the_first_step(tmp_path, task_class):
  config = tiny_config()
  location = (
    "/data/somewhere" if task_class is _EmptyValTask else r"the task's data \(config.data\)"
  )
  with pytest.raises(
    trainer.ConfigError,
    match=rf"the 'val' split \(config.eval.split\) of {location} has no examples",
  ):
    _train(config, tmp_path / "run", task_class(config))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_unknown_best_metric_saves_the_step_then_names_the_metrics(tmp_path):
  config = tiny_config()
  config.checkpoint.best_metric = "eval/auc"
  with pytest.raises(
    trainer.ConfigError,
    match=r"best_metric='eval/auc' is not among the metrics the task reports: "
    r"\['eval/accuracy', 'eval/count'\]\. Step 3 is saved in .*checkpoints",
  ):
    _train(config, tmp_path / "run")
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
  config.checkpoint.best_metric = "eval/accuracy"
  resumed = _train(config, tmp_path / "run")
  assert resumed["step"] == 6 and resumed["best"]["step"] in (3, 6)


def test_nan_message_names_the_step_and_an_existing_checkpoint(tmp_path):
  config = tiny_config()
  config.train.steps = 16  # two epochs: the batch with the NaN example comes in the first
  config.checkpoint.every_steps = 1
  config.data.nan_at = 5
  with pytest.raises(trainer.NonFiniteLossError) as raised:
    _train(config, tmp_path / "nan")
  message = str(raised.value)
  step = int(re.search(r"loss is nan at step (\d+) ", message).group(1))
  assert step > 0, message  # this seed puts the NaN batch after the first step
  match = re.search(r"newest checkpoint is (\S+) \(step (\d+)\)", message)
  assert match, message
  assert int(match.group(2)) == step and os.path.isdir(match.group(1))
  assert not os.path.exists(tmp_path / "nan" / "checkpoints" / str(step + 1))


def test_sigterm_in_a_stage_stops_the_runs_after_it(tmp_path, monkeypatch):
  # main holds a Preemption around the pretraining stages and the main run: a SIGTERM that a
  # stage's run turned into a save must not be forgotten by the next run.
  original = trainer.evaluation.to_global
  calls = {"n": 0}

  def to_global_then_term(batch, sharding):
    calls["n"] += 1
    if calls["n"] == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(batch, sharding)

  monkeypatch.setattr(trainer.evaluation, "to_global", to_global_then_term)
  config = tiny_config()
  with trainer.Preemption() as job:
    stage = _train(config, tmp_path / "stage")
    assert stage["stopped"] == "preempted" and stage["step"] == 2
    assert job.requested
    after = _train(config, tmp_path / "main")
  assert after["stopped"] == "preempted" and after["step"] == 0
  assert not os.path.exists(tmp_path / "main" / "checkpoints" / "1")


# The command's exit codes.


def _main(workdir, *overrides, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  args = [
    *TINY_MAIN,
    f"--config={os.path.join(REPO, 'tests', 'tiny_task_config.py')}",
    f"--workdir={workdir}",
    "--progress=false",
    *overrides,
  ]
  return subprocess.Popen(args, cwd=REPO, env=env, text=True, **kwargs)


def test_main_refuses_a_second_job_and_exits_143_when_preempted(tmp_path):
  workdir = tmp_path / "run"
  steps = ("--config.train.steps=1000000", "--config.eval.every_steps=1000")
  first = _main(
    workdir,
    *steps,
    "--config.checkpoint.every_steps=1000",
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  try:
    deadline = time.monotonic() + 120
    while not (workdir / "metrics.jsonl").exists() or not os.path.getsize(
      workdir / "metrics.jsonl"
    ):
      assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
      time.sleep(0.2)
    second = _main(workdir, *steps, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=120)
    assert second.returncode == console.EXIT_BAD_INPUT, out + err
    assert f"is in use by pid {first.pid} on host" in err
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == console.EXIT_PREEMPTED == 143, out
  saved = int(re.search(r"preempted at step (\d+) \(SIGTERM\)", out).group(1))
  assert os.path.isdir(workdir / "checkpoints" / str(saved))
  again = _main(workdir, f"--config.train.steps={saved + 2}", stdout=subprocess.PIPE)
  out, _ = again.communicate(timeout=120)
  assert again.returncode == 0
  with open(workdir / "summary.json") as f:
    assert json.load(f)["step"] == saved + 2


def test_main_reports_a_negative_step_count_in_one_line(tmp_path):
  run = _main(tmp_path / "run", "--config.train.steps=-5", stderr=subprocess.PIPE)
  _, err = run.communicate(timeout=120)
  assert run.returncode == console.EXIT_BAD_INPUT
  assert err.strip().splitlines()[-1] == (
    "error: config.train.steps must be a positive integer, got -5"
  )
