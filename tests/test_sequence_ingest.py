"""Bad sequence CSVs for the temporal tasks: each refused with the line or file that is wrong."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from image_files import phantom, write_png

from mammojax.data.ingest import sequence_csv, tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig

PREPROCESS = MammoPreprocessConfig(height=16, width=16, orientation="none", crop=False)


def _csv(tmp_path, rows):
  with open(tmp_path / "seq.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["patient_id", "date", "image_path", "label"])
    writer.writeheader()
    writer.writerows(rows)
  return str(tmp_path / "seq.csv")


def _images(tmp_path, sizes):
  for i, (h, w) in enumerate(sizes):
    write_png(str(tmp_path / f"s{i}.png"), (phantom(h, w, seed=i) // 256).astype(np.uint8))


def _plan(tmp_path, rows, **options):
  options = sequence_csv.SequenceOptions(
    fractions=(("train", 1.0),), preprocess=PREPROCESS, **options
  )
  return sequence_csv.plan(_csv(tmp_path, rows), str(tmp_path), options, salt="s")


def _row(patient, date, index, label):
  return dict(patient_id=patient, date=date, image_path=f"s{index}.png", label=label)


def test_unparsable_date_names_the_line(tmp_path):
  _images(tmp_path, [(16, 16)] * 2)
  rows = [_row("A", "2010-01-01", 0, 1), _row("A", "01/02/2011", 1, 1)]
  with pytest.raises(ValueError, match="line 3"):
    _plan(tmp_path, rows)


def test_two_images_on_one_date_are_refused(tmp_path):
  _images(tmp_path, [(16, 16)] * 2)
  rows = [_row("A", "2010-01-01", 0, 1), _row("A", "2010-01-01", 1, 1)]
  with pytest.raises(ValueError, match="lines 2 and 3: one patient has two images dated"):
    _plan(tmp_path, rows)


def test_label_scope_patient_refuses_a_changing_label(tmp_path):
  _images(tmp_path, [(16, 16)] * 2)
  rows = [_row("A", "2010-01-01", 0, 0), _row("A", "2011-01-01", 1, 1)]
  with pytest.raises(ValueError, match=r"line 3: label 1 differs .* label 0 on line 2"):
    _plan(tmp_path, rows, label_scope="patient")
  assert len(_plan(tmp_path, rows, label_scope="image").splits["train"]) == 2


def test_image_of_another_size_is_an_error_row_and_the_rest_goes_on(tmp_path):
  _images(tmp_path, [(16, 16), (20, 16), (16, 16)])
  rows = [
    _row("A", "2010-01-01", 0, 1),
    _row("B", "2010-01-01", 1, 0),
    _row("C", "2012-05-01", 2, 0),
  ]
  plan = _plan(tmp_path, rows, expected_size=(16, 16))
  outcomes = [tabular.run_item(item) for item in plan.splits["train"]]
  errors = [value for status, value in outcomes if status == "error"]
  assert len(errors) == 1 and errors[0].file.endswith("s1.png")
  assert "image is 20x16, the others are 16x16; pass --size=HxW" in errors[0].reason
  assert sum(status == "ok" for status, _ in outcomes) == 2


def test_ingest_command_reports_a_changing_label_in_one_line(tmp_path):
  _images(tmp_path, [(16, 16)] * 2)
  csv_path = _csv(tmp_path, [_row("A", "2010-01-01", 0, 0), _row("A", "2011-01-01", 1, 1)])
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "mammojax.ingest",
      "--task=sequence",
      f"--csv={csv_path}",
      f"--images={tmp_path}",
      f"--out={tmp_path / 'out'}",
      "--label_scope=patient",
      "--size=16x16",
    ],
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert "differs from the same patient's label" in result.stderr
  assert not (tmp_path / "out" / "manifest.json").exists()


def test_float_nifti_slices_keep_their_absolute_intensities(tmp_path):
  nib = pytest.importorskip("nibabel")
  rng = np.random.default_rng(0)
  slices = [rng.uniform(0.0, 0.74, (16, 16)).astype(np.float32) for _ in range(2)]
  for i, pixels in enumerate(slices):
    nib.save(nib.Nifti1Image(pixels, np.eye(4)), str(tmp_path / f"s{i}.nii.gz"))
  rows = [
    dict(patient_id="A", date=f"201{i}-01-01", image_path=f"s{i}.nii.gz", label=1) for i in range(2)
  ]
  preprocess = MammoPreprocessConfig(
    height=16, width=16, orientation="none", crop=False, intensity="unit"
  )
  options = sequence_csv.SequenceOptions(
    fractions=(("train", 1.0),), preprocess=preprocess, expected_size=(16, 16)
  )
  plan = sequence_csv.plan(_csv(tmp_path, rows), str(tmp_path), options, salt="s")
  record = plan.splits["train"][1].build()
  # What the 'unit' input scaling reads back: the slices as stored, to uint16 rounding.
  np.testing.assert_allclose(record["images"] / 65535.0, np.stack(slices), atol=1e-5)
  rng_bad = rng.uniform(0.0, 3.0, (16, 16)).astype(np.float32)
  nib.save(nib.Nifti1Image(rng_bad, np.eye(4)), str(tmp_path / "s0.nii.gz"))
  status, error = tabular.run_item(plan.splits["train"][0])
  assert status == "error" and "not [0, 1]; use --intensity=minmax" in error.reason
