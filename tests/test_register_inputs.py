"""python -m mammojax.register refuses bad inputs before optimising: one line, exit 2, nothing
written to --out; and a normal run reports the folds and the minimum Jacobian determinant."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from image_files import phantom, write_png

from mammojax import register


def _images(tmp_path, fixed: np.ndarray | None = None, moving: np.ndarray | None = None):
  """Writes ``fixed.png`` and ``moving.png`` (tiny phantoms unless given) under ``tmp_path``."""
  default = phantom(12, 10, label=False)
  write_png(str(tmp_path / "fixed.png"), default if fixed is None else fixed)
  write_png(str(tmp_path / "moving.png"), np.roll(default, 1, 0) if moving is None else moving)


def _refused(tmp_path, capsys, *options: str, out: str = "out") -> str:
  """Runs the command expecting exit 2 with one line on stderr; returns that line."""
  argv = [f"--fixed={tmp_path / 'fixed.png'}", f"--moving={tmp_path / 'moving.png'}"]
  with pytest.raises(SystemExit) as exit_info:
    register.run([*argv, f"--out={tmp_path / out}", "--noprogress", *options])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  return lines[0]


@pytest.mark.parametrize(
  "option, message",
  [
    ("--lambda=nan", "--lambda=nan: the regulariser weight must be a finite number >= 0"),
    ("--lambda=-1", "--lambda=-1.0: the regulariser weight must be a finite number >= 0"),
    ("--sigma=0", "--sigma=0.0: the LNCC window width must be a finite number > 0"),
    ("--sigma=inf", "--sigma=inf: the LNCC window width must be a finite number > 0"),
    ("--lr=0", "--lr=0.0: the Adam step size must be a finite number > 0"),
    ("--lr=nan", "--lr=nan: the Adam step size must be a finite number > 0"),
    ("--steps=-1", "--steps"),
  ],
)
def test_bad_setting_is_refused(tmp_path, capsys, option, message):
  _images(tmp_path)
  assert message in _refused(tmp_path, capsys, option)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_constant_image_is_refused_naming_it(tmp_path, capsys, which):
  _images(tmp_path, **{which: np.full((12, 10), 77, np.uint8)})
  line = _refused(tmp_path, capsys)
  assert f"--{which} {tmp_path / f'{which}.png'} is constant (every value is 77)" in line
  assert not os.path.exists(tmp_path / "out")


def test_one_pixel_images_are_refused(tmp_path, capsys):
  _images(tmp_path, np.array([[10]], np.uint8), np.array([[20]], np.uint8))
  line = _refused(tmp_path, capsys)
  assert f"--fixed {tmp_path / 'fixed.png'} has shape (1, 1)" in line
  assert "at least 2 pixels along every axis" in line
  assert not os.path.exists(tmp_path / "out")


def test_single_row_images_are_refused(tmp_path, capsys):
  row = np.arange(10, dtype=np.uint8)[None]
  _images(tmp_path, row, row[:, ::-1].copy())
  assert "has shape (1, 10)" in _refused(tmp_path, capsys)


def test_out_that_is_a_file_is_refused_at_start(tmp_path, capsys):
  _images(tmp_path)
  (tmp_path / "out").write_text("keep")
  line = _refused(tmp_path, capsys)
  assert f"--out {tmp_path / 'out'} is a file" in line
  assert (tmp_path / "out").read_text() == "keep"
  line = _refused(tmp_path, capsys, out="out/sub")
  assert f"lies under the file {tmp_path / 'out'}" in line
  assert (tmp_path / "out").read_text() == "keep"


def test_library_call_refuses_constant_image():
  image = np.zeros((6, 6), np.float32)
  with pytest.raises(register.RegistrationInputError, match="fixed is constant"):
    register.register(image, image, steps=1, progress=False)


def test_summary_reports_folds_and_minimum_jacobian(tmp_path, capsys):
  _images(tmp_path)
  argv = [f"--fixed={tmp_path / 'fixed.png'}", f"--moving={tmp_path / 'moving.png'}"]
  options = ["--steps=3", "--similarity=ssd", "--noprogress", f"--out={tmp_path / 'out'}"]
  summary = register.run([*argv, *options])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
  assert summary["folds"] == 0
  assert np.isfinite(summary["min_jacobian"]) and 0 < summary["min_jacobian"] <= 1.5
  displacement = np.load(tmp_path / "out" / "displacement.npy")
  jacobian = np.linalg.det(
    np.stack([np.stack(np.gradient(displacement[..., c]), -1) for c in range(2)], -2) + np.eye(2)
  )
  np.testing.assert_allclose(summary["min_jacobian"], jacobian.min(), rtol=1e-4, atol=1e-5)
