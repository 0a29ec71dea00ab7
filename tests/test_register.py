"""python -m mammojax.register: instance optimisation on PNG and NIfTI pairs, bad inputs."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from shipped_configs import shipped_config

from mammojax import register


def _blobs(shape):
  grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
  centre = [0.45 * n for n in shape]
  second = [0.65 * n for n in shape]
  first = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (0.04 * min(shape) ** 2))
  other = np.exp(-sum((g - c) ** 2 for g, c in zip(grids, second)) / (0.01 * min(shape) ** 2))
  return first + 0.6 * other


def _register(directory, fixed, moving, *options):
  """``python -m mammojax.register`` of ``directory/moving`` to ``directory/fixed``, writing
  ``directory/out``."""
  return register.run(
    [
      "--fixed",
      str(directory / fixed),
      "--moving",
      str(directory / moving),
      "--out",
      str(directory / "out"),
      *options,
    ]
  )


def _write_png(path, image):
  Image.fromarray(np.round(255 * image / image.max()).astype(np.uint8)).save(path)


def test_png_translation_is_recovered_with_outputs(tmp_path, capsys):
  fixed = _blobs((40, 36))
  shift = (2.0, -1.5)
  # moving(x) = fixed(x - shift), so warped(x) = moving(x + u) matches fixed for u = shift.
  moving = ndimage.shift(fixed, shift, order=1, mode="nearest")
  _write_png(tmp_path / "fixed.png", fixed)
  _write_png(tmp_path / "moving.png", moving)
  out = tmp_path / "out"
  options = ("--steps", "80", "--similarity", "ssd", "--lambda", "0.1", "--noprogress")
  summary = _register(tmp_path, "fixed.png", "moving.png", *options)
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == summary
  assert summary["similarity_after"] < 0.2 * summary["similarity_before"]
  assert summary["folds"] == 0
  displacement = np.load(out / "displacement.npy")
  assert displacement.shape == (40, 36, 2) and displacement.dtype == np.float32
  centre = displacement[12:28, 10:26].reshape(-1, 2).mean(0)
  np.testing.assert_allclose(centre, shift, atol=0.5)
  for name in ("warped.npy", "warped.png", "grid.png"):
    assert os.path.getsize(out / name) > 0


@pytest.mark.parametrize("similarity", ["lncc", "mind"])
def test_nifti_volume_registration_writes_nifti(tmp_path, similarity):
  fixed = _blobs((10, 12, 11))
  moving = ndimage.shift(fixed, (1.0, 0.0, -1.0), order=1, mode="nearest")
  # A world origin other than 0: the outputs must keep it to overlay the inputs.
  affine = np.array([[1.0, 0, 0, -40.5], [0, 1.0, 0, 12.0], [0, 0, 2.0, 7.25], [0, 0, 0, 1]])
  for name, volume in (("fixed", fixed), ("moving", moving)):
    # read_nifti returns (z, y, x); store (x, y, z) so the arrays round-trip.
    nib.save(
      nib.Nifti1Image(np.moveaxis(volume, (0, 1, 2), (2, 1, 0)).astype(np.float32), affine),
      tmp_path / f"{name}.nii.gz",
    )
  out = tmp_path / "out"
  options = ("--steps", "30", "--similarity", similarity, "--sigma", "1.5", "--noprogress")
  summary = _register(tmp_path, "fixed.nii.gz", "moving.nii.gz", *options)
  assert summary["similarity_after"] < summary["similarity_before"]
  displacement = np.load(out / "displacement.npy")
  assert displacement.shape == (10, 12, 11, 3)
  field = nib.load(out / "displacement.nii.gz")
  assert field.shape == (11, 12, 10, 3)
  np.testing.assert_allclose(
    np.asarray(field.dataobj)[..., 0], np.moveaxis(displacement[..., 2], (0, 1, 2), (2, 1, 0))
  )
  assert nib.load(out / "warped.nii.gz").shape == (11, 12, 10)
  for name in ("warped.nii.gz", "displacement.nii.gz"):
    np.testing.assert_allclose(nib.load(out / name).affine, affine)


def test_bad_inputs_give_clear_messages(tmp_path, capsys):
  _write_png(tmp_path / "a.png", _blobs((20, 20)))
  _write_png(tmp_path / "small.png", _blobs((10, 20)))
  nib.save(nib.Nifti1Image(_blobs((6, 6, 6)).astype(np.float32), np.eye(4)), tmp_path / "v.nii")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  nib.save(nib.Nifti1Image(_blobs((6, 6, 1)).astype(np.float32), np.eye(4)), tmp_path / "s.nii")
  cases = {
    "v.nii": "2D",
    "small.png": "resample",
    "broken.png": "cannot decode PNG",
    "missing.png": "does not exist",
  }
  for moving, message in cases.items():
    with pytest.raises(SystemExit) as exit_info:
      _register(tmp_path, "a.png", moving, "--noprogress")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    _register(tmp_path, "s.nii", "s.nii", "--noprogress")
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "s.nii" in err and "single slice" in err
  with pytest.raises(SystemExit):
    _register(tmp_path, "a.png", "a.png", "--model", str(tmp_path))
  assert "neither config.json" in capsys.readouterr().err


def test_starting_from_a_trained_digits_run(tmp_path):
  from mammojax import tasks
  from mammojax.train.trainer import train_and_evaluate

  config = shipped_config("icon_digits", "smoke")
  config.train.steps = config.eval.every_steps = config.checkpoint.every_steps = 2
  run = tmp_path / "run"
  train_and_evaluate(config, str(run), tasks.build_task(config), show_progress=False)
  fixed, moving = _blobs((16, 16)), np.roll(_blobs((16, 16)), 1, axis=0)
  field = register.predict_displacement(
    str(run), fixed.astype(np.float32), moving.astype(np.float32)
  )
  assert field.shape == (16, 16, 2) and np.abs(field).max() > 0
  _write_png(tmp_path / "f.png", fixed)
  _write_png(tmp_path / "m.png", moving)
  _register(tmp_path, "f.png", "m.png", "--model", str(run), "--steps", "0", "--noprogress")
  np.testing.assert_allclose(np.load(tmp_path / "out" / "displacement.npy"), field, atol=1e-3)
