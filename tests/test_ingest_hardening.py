"""Hostile inputs to ingest: image paths leaving --images, patient ids in file names, repeated
rows, volumes on different grids, empty runs and splits, truncated DICOMs and checkpoints."""

import csv
import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from image_files import PHI, phantom, write_dicom, write_nifti, write_png

import mammojax
from mammojax import ingest
from mammojax.data.ingest import (
  longitudinal_csv,
  mil_csv,
  readers,
  reporting,
  sequence_csv,
  tabular,
  volume_csv,
)
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mammojax.__file__)))
COLUMNS = list(longitudinal_csv.REQUIRED_COLUMNS)
SIZE = MammoPreprocessConfig(height=32, width=24)
SMALL = MammoPreprocessConfig(height=16, width=16, orientation="none", crop=False)
OUTSIDE = r"names a file outside the --images folder"


def _write_csv(path, rows, columns=None):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def _row(patient, exam, side, year, image_path, **extra):
  return dict(
    patient_id=patient,
    exam_id=exam,
    ImageLaterality=side,
    view="CC",
    study_date_year=year,
    Time_to_Cancer_Years="",
    years_last_followup=3,
    density="2",
    cancer_type="",
    race="x",
    image_path=image_path,
    **extra,
  )


def _longitudinal(csv_path, images, **options):
  options = longitudinal_csv.LongitudinalOptions(
    preprocess=SIZE, fractions=(("train", 1.0),), **options
  )
  return longitudinal_csv.plan(csv_path, str(images), options, salt="s")


def _cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", "mammojax.ingest", "--progress=false", *map(str, args)],
    capture_output=True,
    env=env,
    cwd=REPO,
    timeout=timeout,
  )


def _one_line(stderr: bytes) -> str:
  lines = [line for line in stderr.decode().splitlines() if line.strip()]
  assert len(lines) == 1 and "Traceback" not in stderr.decode(), stderr.decode()
  return lines[0]


# --- Image paths stay inside --images ------------------------------------------------------------


@pytest.fixture
def escape(tmp_path):
  """An images folder with one good PNG, and a PNG outside it; returns a function giving the
  CSV cell that reaches the outside file in a given way."""
  images, outside = tmp_path / "images", tmp_path / "outside"
  images.mkdir()
  outside.mkdir()
  write_png(str(images / "good.png"), phantom(48, 40, "L", seed=1))
  write_png(str(outside / "secret.png"), phantom(48, 40, "L", seed=2))
  os.symlink(outside / "secret.png", images / "link.png")
  os.symlink(outside, images / "linked_dir")

  def cell(how):
    return {
      "dotdot": "../outside/secret.png",
      "deep_dotdot": "sub/../../outside/secret.png",
      "absolute": str(outside / "secret.png"),
      "symlink": "link.png",
      "symlinked_folder": "linked_dir/secret.png",
    }[how]

  return images, cell


@pytest.mark.parametrize(
  "how", ["dotdot", "deep_dotdot", "absolute", "symlink", "symlinked_folder"]
)
def test_longitudinal_path_outside_images_is_refused(tmp_path, escape, how):
  images, cell = escape
  rows = [_row("P", "e1", "L", 2019, "good.png"), _row("P", "e2", "L", 2021, cell(how))]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  with pytest.raises(ValueError, match=rf"^line 3: column 'image_path' {OUTSIDE}") as info:
    _longitudinal(path, images)
  assert "secret" not in str(info.value) and "outside/" not in str(info.value)


def test_every_csv_kind_confines_its_paths(tmp_path, escape):
  images, cell = escape
  mil = [dict(image_path="good.png", laterality="L", view="CC", Mass=0, Suspicious_Calcification=0)]
  mil.append(dict(mil[0], image_path=cell("symlink")))
  with pytest.raises(ValueError, match=rf"line 3: column 'image_path' {OUTSIDE}"):
    mil_csv.plan(_write_csv(tmp_path / "mil.csv", mil), str(images), mil_csv.MilOptions(), "s")
  by_id = [dict(patient_id="..", image_id="outside/secret", laterality="L", view="CC", Mass=1)]
  options = mil_csv.MilOptions(labels=("Mass",))
  with pytest.raises(ValueError, match=rf"line 2: column 'patient_id/image_id' {OUTSIDE}"):
    mil_csv.plan(_write_csv(tmp_path / "mil2.csv", by_id), str(images), options, "s")
  seq = [
    dict(patient_id="A", date="2010-01-01", image_path="good.png", label=0),
    dict(patient_id="A", date="2011-01-01", image_path=cell("dotdot"), label=0),
  ]
  with pytest.raises(ValueError, match=rf"line 3: column 'image_path' {OUTSIDE}"):
    sequence_csv.plan(
      _write_csv(tmp_path / "seq.csv", seq), str(images), sequence_csv.SequenceOptions(), "s"
    )
  write_nifti(str(images / "t1.nii.gz"), np.ones((4, 4, 4), np.float32))
  for column, value in (("T2", cell("absolute")), ("mask", cell("symlinked_folder"))):
    row = dict(subject="s1", T1="t1.nii.gz", T2="", mask="")
    row[column] = value
    with pytest.raises(ValueError, match=rf"line 2: column '{column}' {OUTSIDE}"):
      volume_csv.plan(
        _write_csv(tmp_path / "vol.csv", [row]), str(images), volume_csv.VolumeOptions(), "s"
      )


def test_name_convention_does_not_follow_a_symlink_out_of_images(tmp_path, escape):
  images, _ = escape
  os.symlink(tmp_path / "outside" / "secret.png", images / "P_L_CC_2019-03-02_0001.png")
  row = _row("P", "e1", "L", 2019, "", study_date="2019-03-02")
  path = _write_csv(tmp_path / "m.csv", [row], COLUMNS + ["study_date"])
  with pytest.raises(
    ValueError, match=rf"line 2: column 'file found by the name convention' {OUTSIDE}"
  ):
    _longitudinal(path, images)


def test_symlinks_inside_images_and_a_symlinked_root_are_fine(tmp_path):
  images = tmp_path / "images"
  (images / "sub").mkdir(parents=True)
  write_png(str(images / "sub" / "a.png"), phantom(48, 40, "L", seed=1))
  os.symlink(images / "sub" / "a.png", images / "alias.png")
  os.symlink(images, tmp_path / "root_link")
  rows = [_row("P", "e1", "L", 2019, "alias.png"), _row("P", "e2", "L", 2021, "sub/../sub/a.png")]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  plan = _longitudinal(path, tmp_path / "root_link")
  assert len(plan.splits["train"]) == 2 and not plan.errors


def test_cli_refuses_an_absolute_path_in_one_line(tmp_path, escape):
  images, _ = escape
  rows = [_row("P", "e1", "L", 2019, "good.png"), _row("P", "e2", "L", 2021, "/etc/passwd")]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  out = tmp_path / "out"
  proc = _cli(f"--csv={path}", f"--images={images}", f"--out={out}")
  assert proc.returncode == ingest.EXIT_BAD_INPUT
  line = _one_line(proc.stderr)
  assert "line 3: column 'image_path' names a file outside the --images folder" in line
  assert "passwd" not in line and "root:" not in line
  assert not (out / "manifest.json").exists()


# --- No patient id in errors.csv, the manifest, the records or the log -------------------------


def test_cli_names_failed_files_by_line_and_salted_reference(tmp_path):
  images = tmp_path / "images"
  (images / "MRN7654321").mkdir(parents=True)
  write_dicom(str(images / "MRN1234567_2019.dcm"), phantom(40, 32, "R", seed=5), laterality="R")
  write_dicom(str(images / "MRN1234567_2021.dcm"), phantom(40, 32, "R", seed=6), laterality="R")
  (images / "MRN7654321_2019.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  write_dicom(str(images / "MRN7654321_2020.dcm"), phantom(40, 32, "L", seed=7), laterality="L")
  full = (images / "MRN7654321_2020.dcm").read_bytes()
  (images / "MRN7654321_2020.dcm").write_bytes(full[:-100])  # cut inside the pixel data
  rows = [
    _row("MRN1234567", "x1", "R", 2019, "MRN1234567_2019.dcm"),
    _row("MRN1234567", "x2", "R", 2021, "MRN1234567_2021.dcm"),
    _row("MRN1234567", "x2", "R", 2021, "./MRN1234567_2021.dcm"),  # a repeat, dropped
    _row("MRN7654321", "y1", "L", 2019, "MRN7654321_2019.png"),
    _row("MRN7654321", "y2", "L", 2020, "MRN7654321_2020.dcm"),
    _row("MRN7654321", "y3", "L", 2022, "MRN7654321/MRN7654321_2022.dcm"),  # missing
  ]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  out = tmp_path / "out"
  proc = _cli(
    f"--csv={path}",
    f"--images={images}",
    f"--out={out}",
    "--size=32x24",
    "--split=train=1.0",
    "--salt=pepper",
    "--duplicates=drop",
  )
  logs = (proc.stdout + proc.stderr).decode()
  assert proc.returncode == ingest.EXIT_FAILED_INPUTS, logs
  with open(out / ingest.ERRORS_FILE) as f:
    errors = list(csv.DictReader(f))
  assert list(errors[0]) == ["rows", "file_ref", "reason"]
  by_line = {e["rows"].split(" (")[0]: e for e in errors}
  assert by_line["line 7"]["reason"] == "file does not exist"
  assert by_line["line 7"]["file_ref"] == reporting.file_ref(
    "MRN7654321/MRN7654321_2022.dcm", str(images), "pepper"
  )
  assert by_line["line 5"]["file_ref"] == reporting.file_ref(
    "MRN7654321_2019.png", str(images), "pepper"
  )
  assert "cannot decode PNG" in by_line["line 5"]["reason"]
  assert "DICOM file is truncated" in by_line["line 6"]["reason"]
  assert re.search(r"line 6 \(prior line 5\): file [0-9a-f]{12}: ", logs)
  assert "dropped 1 duplicated row(s)" in logs
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["config"]["duplicates_dropped"] == 1
  assert manifest["splits"]["train"]["count"] == 2
  secrets_ = ["MRN1234567", "1234567", "MRN7654321", "7654321", *PHI.values(), "Doe", "Janet"]
  blobs = {"log": logs}
  for directory, _, files in os.walk(out):
    for name in files:
      if name != tabular.SALT_FILE:
        blobs[os.path.join(directory, name)] = open(os.path.join(directory, name), "rb").read()
  for secret in secrets_:
    leaks = [
      name
      for name, blob in blobs.items()
      if (secret.encode() in blob if isinstance(blob, bytes) else secret in blob)
    ]
    assert not leaks, (secret, leaks)


def test_reasons_that_embed_the_path_are_scrubbed(tmp_path):
  redactor = reporting.Redactor(str(tmp_path), "s", frozenset({"MRN1234567", "P1"}))
  path = str(tmp_path / "MRN1234567" / "MRN1234567_2019.png")
  error = reporting.ErrorRow(
    "line 2",
    path,
    f"OSError: [Errno 13] Permission denied: '{path}' (patient MRN1234567, file "
    "MRN1234567_2019, prior MRN1234567/other.png)",
  )
  reported = redactor(error, (path, str(tmp_path / "MRN1234567" / "other.png")))
  assert "MRN" not in reported.reason and "1234567" not in reported.reason
  assert reported.file_ref == reporting.file_ref(
    "MRN1234567/MRN1234567_2019.png", str(tmp_path), "s"
  )
  assert reported.reason.startswith("OSError: [Errno 13] Permission denied: '<file>'")
  assert len(reported.file_ref) == 12 and reported.file_ref != reporting.file_ref(path, "/", "s")


# --- Repeated rows ---------------------------------------------------------------------------


def test_longitudinal_duplicates_are_refused_or_dropped(tmp_path):
  write_png(str(tmp_path / "a.png"), phantom(48, 40, "L", seed=1))
  write_png(str(tmp_path / "b.png"), phantom(48, 40, "L", seed=2))
  rows = [
    _row("P", "e1", "L", 2019, "a.png"),
    _row("P", "e2", "L", 2021, "b.png"),
    _row("P", "e2", "L", 2021, "./b.png"),
  ]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  what = "the same patient, exam, laterality, view and image"
  with pytest.raises(ValueError, match=rf"lines 3 and 4 are duplicates \({what}\).*--duplicates"):
    _longitudinal(path, tmp_path)
  plan = _longitudinal(path, tmp_path, duplicates="drop")
  assert [i.rows for i in plan.splits["train"]] == ["line 2", "line 3 (prior line 2)"]
  assert plan.config["duplicates_dropped"] == 1
  rows[2]["years_last_followup"] = 5
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  with pytest.raises(ValueError, match=r"lines 3 and 4 .* differ in column\(s\) 'years_last"):
    _longitudinal(path, tmp_path, duplicates="drop")


def test_mil_and_sequence_duplicates_are_refused_or_dropped(tmp_path):
  write_png(str(tmp_path / "a.png"), phantom(48, 40, "R", seed=1))
  lesion = dict(patient_id="p", image_path="a.png", laterality="R", view="CC", Mass=1)
  box = dict(lesion, xmin=2, ymin=2, xmax=9, ymax=9)
  path = _write_csv(tmp_path / "mil.csv", [box, lesion, box])
  options = mil_csv.MilOptions(labels=("Mass",), fractions=(("train", 1.0),), preprocess=SIZE)
  with pytest.raises(ValueError, match=r"lines 2 and 4 are duplicates"):
    mil_csv.plan(path, str(tmp_path), options, "s")
  dropped = dataclasses.replace(options, duplicates="drop")
  plan = mil_csv.plan(path, str(tmp_path), dropped, "s")
  (item,) = plan.splits["train"]
  assert len(item.source_boxes) == 1 and item.rows == "line 2, line 3"

  write_png(str(tmp_path / "s.png"), (phantom(16, 16, seed=3) // 256).astype(np.uint8))
  row = dict(patient_id="A", date="2010-01-01", image_path="s.png", label=0)
  path = _write_csv(tmp_path / "seq.csv", [row, dict(row, image_path="./s.png")])
  options = sequence_csv.SequenceOptions(fractions=(("train", 1.0),), preprocess=SMALL)
  with pytest.raises(ValueError, match=r"lines 2 and 3 are duplicates \(the same patient and"):
    sequence_csv.plan(path, str(tmp_path), options, "s")
  dropped = sequence_csv.SequenceOptions(
    fractions=(("train", 1.0),), preprocess=SMALL, duplicates="drop"
  )
  plan = sequence_csv.plan(path, str(tmp_path), dropped, "s")
  assert len(plan.splits["train"]) == 1 and plan.config["duplicates_dropped"] == 1


def test_mil_image_under_two_patients_is_refused(tmp_path):
  write_png(str(tmp_path / "a.png"), phantom(48, 40, "R", seed=1))
  first = dict(patient_id="p1", image_path="a.png", laterality="R", view="CC", Mass=1)
  path = _write_csv(tmp_path / "mil.csv", [first, dict(first, patient_id="p2", Mass=0)])
  options = mil_csv.MilOptions(labels=("Mass",), fractions=(("train", 1.0),), preprocess=SIZE)
  with pytest.raises(ValueError, match=r"lines 2 and 3 name the same image under different"):
    mil_csv.plan(path, str(tmp_path), options, "s")


def test_volume_subject_on_two_rows_names_both_lines(tmp_path):
  write_nifti(str(tmp_path / "t1.nii.gz"), np.ones((4, 4, 4), np.float32))
  row = dict(subject="s1", T1="t1.nii.gz")
  path = _write_csv(tmp_path / "v.csv", [row, row])
  with pytest.raises(ValueError, match=r"lines 2 and 3 are duplicates \(the same subject\)"):
    volume_csv.plan(path, str(tmp_path), volume_csv.VolumeOptions(), "s")
  plan = volume_csv.plan(path, str(tmp_path), volume_csv.VolumeOptions(duplicates="drop"), "s")
  assert sum(map(len, plan.splits.values())) == 1


# --- Volumes on different voxel grids ---------------------------------------------------------


def _nifti(path, volume, affine):
  import nibabel as nib

  nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(path))


@pytest.mark.parametrize(
  "column, affine, reason",
  [
    ("T2", np.diag([1.0, 1.0, 2.5, 1.0]), r"contrast 'T2' has voxel spacing .* different voxel"),
    ("T2", np.array([[1, 0, 0, 7.0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]), "another affine"),
    ("mask", np.diag([2.0, 1.0, 2.0, 1.0]), r"the mask has voxel spacing"),
  ],
)
def test_contrasts_of_one_shape_on_different_grids_are_refused(tmp_path, column, affine, reason):
  volume = np.zeros((6, 6, 6), np.float32)
  volume[1:5, 1:5, 1:5] = 1.0
  grid = np.diag([1.0, 1.0, 2.0, 1.0])
  _nifti(tmp_path / "t1.nii.gz", volume, grid)
  _nifti(tmp_path / "t2.nii.gz", volume, grid)
  _nifti(tmp_path / "seg.nii.gz", volume, grid)
  _nifti(tmp_path / f"other_{column}.nii.gz", volume, affine)
  row = dict(subject="s1", T1="t1.nii.gz", T2="t2.nii.gz", mask="seg.nii.gz")
  path = _write_csv(tmp_path / "v.csv", [row])
  options = volume_csv.VolumeOptions(size=(8, 8, 8), fractions=(("train", 1.0),))
  (item,) = volume_csv.plan(path, str(tmp_path), options, "s").splits["train"]
  assert tabular.run_item(item)[0] == "ok"
  row[column] = f"other_{column}.nii.gz"
  (item,) = volume_csv.plan(_write_csv(path, [row]), str(tmp_path), options, "s").splits["train"]
  status, error = tabular.run_item(item)
  assert status == "error" and re.search(reason, error.reason), error
  assert error.file.endswith(f"other_{column}.nii.gz")


# --- Empty runs and splits -------------------------------------------------------------------


def test_cli_missing_images_folder_is_one_line_and_exit_2(tmp_path):
  path = _write_csv(
    tmp_path / "m.csv", [_row("P", "e1", "L", 2019, "a.png")], COLUMNS + ["image_path"]
  )
  proc = _cli(f"--csv={path}", f"--images={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == ingest.EXIT_BAD_INPUT
  assert "the images folder does not exist" in _one_line(proc.stderr)
  assert not (tmp_path / "out").exists()


def test_a_run_where_every_input_failed_writes_no_manifest(tmp_path):
  (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  rows = [_row("P", "e1", "L", 2019, "a.png"), _row("Q", "e2", "L", 2019, "gone.png")]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  out = tmp_path / "out"
  out.mkdir()
  (out / "manifest.json").write_text("{}")  # left by an earlier run
  with pytest.raises(ingest.NoRecordsError, match=r"every input failed \(2 error\(s\)") as info:
    ingest.write_dataset(_longitudinal(path, tmp_path), str(out), fingerprint="f")
  assert info.value.failed == 2
  assert not (out / "manifest.json").exists()
  assert len(list(csv.DictReader(open(out / ingest.ERRORS_FILE)))) == 2
  assert not [n for n in os.listdir(out / ingest.STATE_DIR) if n.endswith(".json")]

  proc = _cli(f"--csv={path}", f"--images={tmp_path}", f"--out={tmp_path / 'cli'}", "--size=32x24")
  assert proc.returncode == ingest.EXIT_FAILED_INPUTS, proc.stderr.decode()
  assert b"every input failed (2 error(s)" in proc.stderr and b"Traceback" not in proc.stderr
  assert (tmp_path / "cli" / ingest.ERRORS_FILE).exists()
  assert not (tmp_path / "cli" / "manifest.json").exists()


def test_empty_split_after_the_patient_split_is_a_warning_with_counts(tmp_path):
  for i in range(2):
    write_png(str(tmp_path / f"{i}.png"), phantom(48, 40, "L", seed=i))
  rows = [_row(f"P{i}", f"e{i}", "L", 2019, f"{i}.png") for i in range(2)]
  path = _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  out = tmp_path / "out"
  proc = _cli(
    f"--csv={path}",
    f"--images={tmp_path}",
    f"--out={out}",
    "--size=32x24",
    "--split=train=0.5,val=0.25,test=0.25",
  )
  logs = proc.stderr.decode()
  assert proc.returncode == ingest.EXIT_OK, logs
  assert re.search(
    r"warning: the test split is empty \(records: train 1, val 1, test 0; "
    r"patients: train 1, val 1, test 0\)",
    logs,
  ), logs
  assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["count"] == 0


# --- Truncated files ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [-100, -2600, 600, 380, 200])
def test_truncated_dicom_is_reported_as_truncated(tmp_path, keep):
  path = tmp_path / "a.dcm"
  write_dicom(str(path), phantom(40, 32, "L", seed=1))
  data = path.read_bytes()
  path.write_bytes(data[:keep] if keep > 0 else data[: len(data) + keep])
  with pytest.raises(readers.ImageReadError, match=r"DICOM file is truncated \(.*\); copy it"):
    readers.read_dicom(str(path))


def test_unreadable_checkpoints_say_what_they_are(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from mammojax.convert.__main__ import run
  from mammojax.convert.torch_files import load_torch_state_dict

  (tmp_path / "text.pt").write_text("hello world, not weights\n")
  torch.save({"w": torch.zeros(64, 64)}, tmp_path / "whole.pt")
  whole = (tmp_path / "whole.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
  (tmp_path / "empty.pt").write_bytes(b"")
  (tmp_path / "plain.pt").write_bytes(pickle.dumps({"w": [1, 2]}))
  torch.save({"w": torch.zeros(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
  (tmp_path / "old_cut.pt").write_bytes((tmp_path / "old.pt").read_bytes()[:-10])
  cases = {
    "text.pt": "not a torch checkpoint: the file starts with 'hello wor'",
    "cut.pt": "truncated zip archive",
    "empty.pt": "not a torch checkpoint: the file is empty",
    "plain.pt": "not a torch checkpoint: a Python pickle without torch's header",
    "old_cut.pt": "truncated torch checkpoint (legacy pickle format",
  }
  for name, message in cases.items():
    with pytest.raises(ValueError, match=re.escape(message)):
      load_torch_state_dict(str(tmp_path / name))
  assert sorted(load_torch_state_dict(str(tmp_path / "whole.pt"))) == ["w"]
  assert run(["mirai", str(tmp_path / "text.pt"), f"--out={tmp_path / 'out'}"]) == 1
  assert cases["text.pt"] in capsys.readouterr().err
