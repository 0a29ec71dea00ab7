"""Every ``python -m mammojax.<command>`` on the one CLI stack: ``--help`` lists the command's
flags and exits 0; a stray positional argument ends it with one line and exit code 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each command and flags its --help must list.
COMMANDS = {
  "main": ("--config", "--workdir", "--keep_freed_host_memory"),
  "evaluate": ("--workdir", "--checkpoint", "--split", "--threshold"),
  "ablate": ("--config", "--field", "--values"),
  "extract_features": ("--config", "--out", "--dtype"),
  "ingest": ("--csv", "--images", "--out", "--task"),
  "register": ("--fixed", "--moving", "--model", "--similarity"),
  "convert": ("--out", "--input_shape", "--config", "--backbone"),
}


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
  )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_flag_and_exits_0(command):
  result = _run(f"mammojax.{command}", "--help")
  assert result.returncode == 0, result.stderr
  for flag in COMMANDS[command]:
    assert f"{flag}:" in result.stdout or f"--[no]{flag[2:]}:" in result.stdout, flag


REQUIRED = {
  "main": ("--config=configs/icon_digits.py:smoke", "--workdir=/nonexistent/run"),
  "evaluate": ("--workdir=/nonexistent/run",),
  "register": ("--fixed=a.png", "--moving=b.png", "--out=/nonexistent/out"),
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_stray_arguments_end_with_one_line(command):
  result = _run(f"mammojax.{command}", *REQUIRED[command], "stray")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: unexpected arguments ['stray']")
  assert "Traceback" not in result.stderr
