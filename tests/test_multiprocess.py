"""Multi-host training with real processes: launch/local_multiprocess.py starts two
``jax.distributed`` CPU processes running the real trainer on the tiny test task, and their losses
must equal a single-process run's (same global batches, whatever the process count)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import local_multiprocess  # noqa: E402

TINY_MAIN = (sys.executable, os.path.join(REPO, "tests", "run_tiny_task.py"), "mammojax.main")
TIMEOUT_S = 300


def _main_args(workdir, *overrides):
  return [
    f"--config={os.path.join(REPO, 'tests', 'tiny_task_config.py')}",
    f"--workdir={workdir}",
    "--progress=false",
    *overrides,
  ]


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
  return train, evals


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
  """The reference: one process, one device."""
  workdir = str(tmp_path_factory.mktemp("single"))
  result = subprocess.run(
    [*TINY_MAIN, *_main_args(workdir)],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=local_multiprocess.process_env(1),
    timeout=TIMEOUT_S,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return _read_metrics(workdir)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
  "devices_per_process, mesh_shape",
  [
    (1, "(-1,1,1)"),  # data parallel across the two processes
    (2, "(-1,2,1)"),  # data x fsdp over 4 devices: parameters sharded too
  ],
)
def test_two_processes_match_single_process(
  tmp_path, single_process_run, devices_per_process, mesh_shape
):
  workdir = str(tmp_path / "multi")
  results = local_multiprocess.launch(
    2,
    _main_args(workdir, f"--config.mesh.shape={mesh_shape}"),
    devices_per_process,
    timeout=TIMEOUT_S,
    command=TINY_MAIN,
  )
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} failed:\n{r.stdout}"
    assert "finished: {'step': 6" in r.stdout, r.stdout
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["step"] == 6
  train, evals = _read_metrics(workdir)
  ref_train, ref_evals = single_process_run
  assert sorted(train) == sorted(ref_train) == list(range(1, 7))
  steps = sorted(ref_train)
  np.testing.assert_allclose(
    [train[s] for s in steps], [ref_train[s] for s in steps], rtol=1e-5, atol=0
  )
  assert evals == ref_evals


def test_launcher_stops_the_others_when_one_fails():
  # Process 1 fails at once; process 0 would otherwise run for a minute.
  script = (
    "import sys, time\n"
    "pid = int(next(a for a in sys.argv if a.startswith('--process_id=')).split('=')[1])\n"
    "print('started', pid, flush=True)\n"
    "sys.exit(3) if pid == 1 else time.sleep(60)\n"
  )
  start = time.monotonic()
  results = local_multiprocess.launch(2, [], command=(sys.executable, "-c", script), timeout=60)
  assert time.monotonic() - start < 30
  assert results[1].returncode == 3
  assert results[0].returncode != 0  # terminated, not finished
  assert results[0].stdout == "started 0\n"
  assert local_multiprocess.exit_code(results) != 0


def test_process_env_replaces_inherited_device_count():
  env = local_multiprocess.process_env(
    3, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"}
  )
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["XLA_FLAGS"].split() == [
    "--xla_cpu_enable_fast_math=false",
    "--xla_force_host_platform_device_count=3",
  ]
