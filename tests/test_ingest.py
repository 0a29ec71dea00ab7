"""Ingestion end to end: CSVs + real-format files -> ArrayRecord shards, errors, resume, privacy."""

import csv
import datetime
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from image_files import PHI, phantom, write_dicom, write_nifti, write_png

from mammojax import ingest
from mammojax.data import records
from mammojax.data.ingest import (
  longitudinal_csv,
  mil_csv,
  reporting,
  sequence_csv,
  tabular,
  volume_csv,
)
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig
from mammojax.data.survival import survival_targets

SIZE = MammoPreprocessConfig(height=32, width=24)
COLUMNS = list(longitudinal_csv.REQUIRED_COLUMNS)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_csv(path, rows, columns):
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _row(patient, exam, side, year, ttc="", followup=3, density="2", ctype="", **extra):
  return dict(
    patient_id=patient,
    exam_id=exam,
    ImageLaterality=side,
    view="CC",
    study_date_year=year,
    Time_to_Cancer_Years=ttc,
    years_last_followup=followup,
    density=density,
    cancer_type=ctype,
    race="x",
    **extra,
  )


@pytest.fixture
def cohort(tmp_path):
  """Three patients; P2 has no prior; one corrupt file; P1 has cancer 2 years after 2020."""
  images = tmp_path / "images"
  images.mkdir()
  rows = []
  specs = [
    ("P1", "e1", "L", 2018, "4", 6),
    ("P1", "e2", "L", 2020, "2", 4),
    ("P1", "e3", "R", 2020, "2", 4),
    ("P2", "e4", "L", 2021, "", 3),
    ("P3", "e5", "R", 2017, "", 7),
    ("P3", "e6", "R", 2019, "", 5),
    ("P3", "e7", "R", 2021, "", 3),
  ]
  for i, (patient, exam, side, year, ttc, followup) in enumerate(specs):
    name = f"{exam}_{side}.png"
    if exam == "e6":
      (images / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    else:
      write_png(str(images / name), phantom(48, 40, side, seed=i))
    rows.append(_row(patient, exam, side, year, ttc, followup, image_path=name))
  csv_path = tmp_path / "meta.csv"
  _write_csv(csv_path, rows, COLUMNS + ["image_path"])
  return str(csv_path), str(images)


def _plan(csv_path, images, **kw):
  options = longitudinal_csv.LongitudinalOptions(
    preprocess=SIZE, fractions=(("train", 0.5), ("test", 0.5)), **kw
  )
  return longitudinal_csv.plan(csv_path, images, options, salt="s3cret")


def _read_all(directory):
  manifest = records.read_manifest(directory)
  out = {}
  for split in manifest["splits"]:
    for path in records.shard_paths(directory, split):
      from array_record.python import array_record_module

      reader = array_record_module.ArrayRecordReader(path)
      out.setdefault(split, []).extend(
        records.decode_example(reader.read([i])[0]) for i in range(reader.num_records())
      )
      reader.close()
  return manifest, out


def test_pairs_priors_targets_and_missing_prior(cohort):
  plan = _plan(*cohort)
  items = [i for split in plan.splits.values() for i in split]
  by_line = {i.order[0]: i for i in items}
  # Line numbers: header is line 1, so e1 is line 2.
  assert by_line[3].order == (3, 2)  # P1 e2 (L) paired with e1 (L).
  assert by_line[4].fields["has_prior"] == 0  # P1 e3 is the only right image of P1.
  assert by_line[5].fields["has_prior"] == 0  # P2 has a single exam.
  assert by_line[3].fields["time_gap"] == pytest.approx(2.0)
  # Time_to_Cancer_Years 2 -> event index 1 (BCRBench: ceil(t) - 1); prior at 4 -> index 3.
  np.testing.assert_array_equal(by_line[3].fields["target"], [0, 1, 1, 1, 1])
  np.testing.assert_array_equal(by_line[3].fields["target_prior"], [0, 0, 0, 1, 1])
  t, m = survival_targets(100.0, 3.0, 5)
  np.testing.assert_array_equal(by_line[5].fields["y_mask"], m)
  assert by_line[5].fields["years_to_cancer"] == 100.0
  # The corrupt e6 is still planned (it fails when decoded); e7's latest prior is e6.
  assert by_line[8].order == (8, 7)
  # Patient-level split: all items of a patient share a split.
  where = {}
  for split, split_items in plan.splits.items():
    for item in split_items:
      assert where.setdefault(item.fields["patient_hash"], split) == split


def test_prior_modes_min_gap_and_drop(cohort):
  all_priors = _plan(*cohort, prior="all")
  lines = sorted(i.order for s in all_priors.splits.values() for i in s)
  assert (8, 7) in lines and (8, 6) in lines
  gap = _plan(*cohort, min_gap_years=3.0)
  by_line = {i.order[0]: i for s in gap.splits.values() for i in s}
  assert by_line[8].order == (8, 6)  # 2021 vs 2017; 2019 is too close.
  assert by_line[3].fields["has_prior"] == 0
  dropped = _plan(*cohort, missing_prior="drop")
  assert all(i.fields["has_prior"] == 1 for s in dropped.splits.values() for i in s)


def test_ingest_writes_shards_errors_and_stats(cohort, tmp_path):
  out = str(tmp_path / "out")
  plan = _plan(*cohort)
  summary = ingest.write_dataset(plan, out, fingerprint="f", records_per_shard=2)
  assert summary.failed == 2  # e6 as a current image and as e7's prior.
  with open(os.path.join(out, ingest.ERRORS_FILE)) as f:
    errors = list(csv.DictReader(f))
  assert {e["file_ref"] for e in errors} == {reporting.file_ref("e6_R.png", cohort[1], "s3cret")}
  assert all("PNG" in e["reason"] for e in errors)
  manifest, data = _read_all(out)
  assert sum(len(v) for v in data.values()) == 5
  assert manifest["config"]["failed"] == 2
  example = next(iter(data.values()))[0]
  assert example["current_image"].dtype == np.uint16
  assert example["current_image"].shape == (32, 24)
  assert example["target"].dtype == np.float32 and example["has_prior"].dtype == np.int32
  assert isinstance(example["patient_hash"], str) and len(example["patient_hash"]) == 64
  train = np.concatenate([r["current_image"].ravel() for r in data["train"]]).astype(np.float64)
  assert manifest["config"]["pixel_mean"] == pytest.approx(train.mean())
  assert manifest["config"]["pixel_std"] == pytest.approx(train.std())
  for split, entry in manifest["splits"].items():
    assert entry["count"] == len(data.get(split, []))
    for name in entry["shards"]:
      assert entry["sha256"][name] == records.file_sha256(os.path.join(out, name))


def test_resume_after_kill_gives_identical_bytes(cohort, tmp_path):
  out = str(tmp_path / "out")
  ingest.write_dataset(_plan(*cohort), out, fingerprint="f", records_per_shard=1)
  names = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
  before = {n: open(os.path.join(out, n), "rb").read() for n in names + ["manifest.json"]}
  # A kill mid-run leaves a shard missing, a temporary file and no manifest.
  os.remove(os.path.join(out, names[1]))
  os.remove(os.path.join(out, "manifest.json"))
  open(os.path.join(out, names[1] + ".tmp-999"), "wb").write(b"partial")
  summary = ingest.write_dataset(_plan(*cohort), out, fingerprint="f", records_per_shard=1)
  assert summary.shards_written == 1 and summary.shards_skipped == len(names) - 1
  after = {n: open(os.path.join(out, n), "rb").read() for n in names + ["manifest.json"]}
  assert after == before
  assert not os.path.exists(os.path.join(out, names[1] + ".tmp-999"))
  # Different inputs (fingerprint) never reuse old shards; a new shard count drops old shards.
  again = ingest.write_dataset(_plan(*cohort), out, fingerprint="g", records_per_shard=1)
  assert again.shards_skipped == 0
  ingest.write_dataset(_plan(*cohort), out, fingerprint="g", records_per_shard=100)
  manifest, data = _read_all(out)
  listed = {n for entry in manifest["splits"].values() for n in entry["shards"]}
  assert {n for n in os.listdir(out) if n.endswith(".array_record")} == listed
  assert sum(len(v) for v in data.values()) == 5


def test_parallel_workers_match_serial(cohort, tmp_path):
  serial, parallel = str(tmp_path / "a"), str(tmp_path / "b")
  ingest.write_dataset(_plan(*cohort), serial, fingerprint="f", records_per_shard=3)
  ingest.write_dataset(_plan(*cohort), parallel, fingerprint="f", records_per_shard=3, workers=2)
  for name in os.listdir(serial):
    if name.endswith(".array_record") or name == "manifest.json":
      assert (
        open(os.path.join(serial, name), "rb").read()
        == open(os.path.join(parallel, name), "rb").read()
      )


def test_missing_column_is_named(tmp_path):
  path = tmp_path / "meta.csv"
  _write_csv(path, [_row("P", "e", "L", 2020)], [c for c in COLUMNS if c != "years_last_followup"])
  with pytest.raises(ValueError, match="missing required column.*'years_last_followup'"):
    _plan(str(path), str(tmp_path))


def test_negative_time_gap_is_explained(tmp_path):
  write_png(str(tmp_path / "a.png"), phantom(seed=1))
  write_png(str(tmp_path / "b.png"), phantom(seed=2))
  rows = [
    _row("P", "e1", "L", 2020, image_path="a.png", prior_exam_id=""),
    _row("P", "e2", "L", 2018, image_path="b.png", prior_exam_id="e1"),
  ]
  _write_csv(tmp_path / "meta.csv", rows, COLUMNS + ["image_path", "prior_exam_id"])
  with pytest.raises(ValueError, match=r"line 3 \(patient [0-9a-f]{12}\).*negative time gap.*fix"):
    _plan(str(tmp_path / "meta.csv"), str(tmp_path))


def test_filename_convention(tmp_path):
  root = tmp_path / "imgs"
  (root / "sub").mkdir(parents=True)
  write_png(str(root / "sub" / "77_L_CC_2019-03-02_0001.png"), phantom(seed=3))
  write_png(str(root / "77_L_CC_2021-05-06_0002.png"), phantom(seed=4))
  rows = [
    _row("77", "a", "L", 2019, study_date="2019-03-02"),
    _row("77", "b", "L", 2021, study_date="2021-05-06"),
    _row("77", "c", "L", 2022, study_date="2022-01-01"),
  ]
  _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["study_date"])
  plan = _plan(str(tmp_path / "m.csv"), str(root))
  items = [i for s in plan.splits.values() for i in s]
  assert len(items) == 2 and len(plan.errors) == 1
  assert "name convention" in plan.errors[0].reason
  pair = next(i for i in items if i.fields["has_prior"])
  days = (datetime.date(2021, 5, 6) - datetime.date(2019, 3, 2)).days
  assert pair.fields["time_gap"] == pytest.approx(days / 365.25, abs=1e-4)


def test_cli_privacy_exit_code_and_logs(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  write_dicom(str(images / "cur.dcm"), phantom(40, 32, "R", seed=5), laterality="R", compress="rle")
  write_dicom(
    str(images / "pri.dcm"), phantom(40, 32, "R", seed=6), laterality="R", photometric="MONOCHROME2"
  )
  (images / "bad.dcm").write_bytes(b"\x00" * 200)
  rows = [
    _row("MRN-555-0199", "x1", "R", 2019, image_path="pri.dcm"),
    _row("MRN-555-0199", "x2", "R", 2021, image_path="cur.dcm"),
    _row("Q", "x3", "L", 2021, image_path="bad.dcm"),
  ]
  _write_csv(tmp_path / "m.csv", rows, COLUMNS + ["image_path"])
  out = tmp_path / "out"
  cmd = [
    sys.executable,
    "-m",
    "mammojax.ingest",
    f"--csv={tmp_path / 'm.csv'}",
    f"--images={images}",
    f"--out={out}",
    "--size=32x24",
    "--split=train=1.0",
    "--keep_columns=race",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(cmd, capture_output=True, env=env, cwd=REPO, timeout=300)
  logs = proc.stdout + proc.stderr
  assert proc.returncode == ingest.EXIT_FAILED_INPUTS, logs.decode()
  assert b"1 input(s) failed" in logs
  _, data = _read_all(str(out))
  assert [r["has_prior"] for r in data["train"]] == [0, 1]
  assert data["train"][0]["meta_race"] == "x"
  # The birth year alone counts as a leak, but only as a number of its own: log lines carry
  # timestamps and thread ids in which any four digits can occur.
  secrets_ = [re.escape(v.encode()) for v in PHI.values()]
  secrets_ += [b"Doe", b"Janet", rb"(?<![0-9])1958(?![0-9])", b"free text"]
  blobs = {"logs": logs}
  blobs.update(
    {
      os.path.join(d, n): open(os.path.join(d, n), "rb").read()
      for d, _, files in os.walk(out)
      for n in files
    }
  )
  for secret in secrets_:
    found = [
      (name, match.group(0), blob[max(0, match.start() - 40) : match.end() + 40])
      for name, blob in blobs.items()
      for match in [re.search(secret, blob)]
      if match
    ]
    assert not found, (secret, found)
  # A bad CSV is exit code 2 and writes no manifest.
  _write_csv(tmp_path / "bad.csv", rows, COLUMNS[:-1] + ["image_path"])
  proc = subprocess.run(
    cmd[:3] + [f"--csv={tmp_path / 'bad.csv'}", f"--images={images}", f"--out={tmp_path / 'o2'}"],
    capture_output=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )
  assert proc.returncode == ingest.EXIT_BAD_INPUT
  assert b"'race'" in proc.stderr
  assert not (tmp_path / "o2").exists()


def test_mil_csv_labels_and_boxes(tmp_path):
  (tmp_path / "p1").mkdir()
  image = phantom(48, 40, "R", label=False, seed=7)
  image[10:20, 22:30] = 65535  # A bright lesion exactly inside the annotated box.
  write_png(str(tmp_path / "p1" / "img1.png"), image)
  rows = [
    dict(
      patient_id="p1",
      image_id="img1",
      laterality="R",
      view="MLO",
      finding_categories="['Mass']",
      xmin=22,
      ymin=10,
      xmax=30,
      ymax=20,
      split="training",
    ),
    dict(
      patient_id="p1",
      image_id="img1",
      laterality="R",
      view="MLO",
      finding_categories="['Suspicious Calcification']",
      xmin="",
      ymin="",
      xmax="",
      ymax="",
      split="training",
    ),
  ]
  _write_csv(tmp_path / "m.csv", rows, list(rows[0]))
  plan = mil_csv.plan(
    str(tmp_path / "m.csv"), str(tmp_path), mil_csv.MilOptions(preprocess=SIZE), salt="s"
  )
  (item,) = plan.splits["train"]
  record = item.build()
  np.testing.assert_array_equal(record["labels"], [1, 1])
  assert record["num_boxes"] == 1 and record["view"] == 1 and record["laterality"] == 1
  x0, y0, x1, y1 = record["boxes"][0]
  # The mapped box (through crop, mirror and resize) covers the lesion and little else.
  rows_, cols = np.nonzero(record["image"] > 60000)
  assert cols.min() >= np.floor(x0) - 1 and cols.max() <= np.ceil(x1)
  assert rows_.min() >= np.floor(y0) - 1 and rows_.max() <= np.ceil(y1)
  assert (x1 - x0) * (y1 - y0) <= 2 * len(cols) + 2 * ((x1 - x0) + (y1 - y0))


def _sequence_plan(directory, **options):
  """Plans one patient's three yearly 16x16 PNGs (labels 0, 1, 0) as sequences."""
  for i in range(3):
    write_png(str(directory / f"s{i}.png"), (phantom(seed=i) // 256).astype(np.uint8))
  rows = [
    dict(patient_id="A", date=f"20{10 + i}-01-01", image_path=f"s{i}.png", label=i % 2)
    for i in range(3)
  ]
  _write_csv(directory / "m.csv", rows, list(rows[0]))
  options = sequence_csv.SequenceOptions(
    fractions=(("train", 1.0),),
    preprocess=MammoPreprocessConfig(height=16, width=16, orientation="none", crop=False),
    **options,
  )
  return sequence_csv.plan(str(directory / "m.csv"), str(directory), options, salt="s")


def test_sequence_csv_windows(tmp_path):
  plan = _sequence_plan(tmp_path, max_length=2)
  items = plan.splits["train"]
  assert [int(i.fields["length"]) for i in items] == [1, 2, 2]
  last = items[2].build()
  assert last["images"].shape == (2, 16, 16) and last["label"] == 0
  np.testing.assert_allclose(last["time_offsets"], [365 / 365.25, 0.0], atol=1e-6)


def test_volume_csv_contrasts_and_mask(tmp_path):
  vol = np.zeros((10, 8, 6), np.float32)
  vol[2:8, 1:7, 1:5] = np.random.default_rng(0).uniform(1, 2, (6, 6, 4))
  write_nifti(str(tmp_path / "t1.nii.gz"), vol, spacing=(1.0, 1.0, 2.0))
  write_nifti(str(tmp_path / "seg.nii.gz"), (vol > 1.5).astype(np.float32), (1.0, 1.0, 2.0))
  rows = [
    dict(subject="s1", T1="t1.nii.gz", T2="", mask="seg.nii.gz"),
    dict(subject="s2", T1="absent.nii.gz", T2="", mask=""),
  ]
  _write_csv(tmp_path / "m.csv", rows, list(rows[0]))
  options = volume_csv.VolumeOptions(size=(8, 8, 8), fractions=(("train", 1.0),))
  plan = volume_csv.plan(str(tmp_path / "m.csv"), str(tmp_path), options, salt="s")
  assert plan.config["contrasts"] == ["T1", "T2"] and len(plan.errors) == 1
  record = plan.splits["train"][0].build()
  assert record["volume"].shape == (8, 8, 8, 2) and record["volume"].dtype == np.float16
  np.testing.assert_array_equal(record["contrast_present"], [1, 0])
  assert not record["volume"][..., 1].any()
  fg = record["volume"][..., 0] != 0
  assert abs(float(record["volume"][..., 0][fg].astype(np.float32).mean())) < 1e-2
  assert record["mask"].dtype == np.uint8 and set(np.unique(record["mask"])) <= {0, 1}
  assert record["mask"].any() and record["has_mask"] == 1


def test_split_is_stratified_by_outcome():
  outcomes = {f"p{i}": int(i < 10) for i in range(50)}
  split = tabular.stratified_patient_split(outcomes, {"train": 0.8, "test": 0.2}, seed=1)
  positives_in_test = sum(1 for p, s in split.items() if s == "test" and outcomes[p])
  assert positives_in_test == 2 and sum(s == "test" for s in split.values()) == 10
  assert split == tabular.stratified_patient_split(outcomes, {"train": 0.8, "test": 0.2}, 1)


def test_ingested_longitudinal_data_feeds_the_training_pipeline(cohort, tmp_path):
  """Real-format files -> ingest -> the same decoding and batching the ImgFeatAlign task uses."""
  from mammojax.data.pipelines import batching
  from mammojax.data.pipelines.longitudinal import longitudinal_dataset

  out = str(tmp_path / "out")
  ingest.write_dataset(_plan(*cohort), out, fingerprint="f", records_per_shard=2)
  examples = longitudinal_dataset(out, "train")
  batch = next(
    batching.eval_batches(examples, global_batch_size=2, process_index=0, process_count=1)
  )
  assert batch["current_image"].shape == (2, 32, 24, 1)
  assert batch["current_image"].dtype == np.float32
  assert batch["previous_image"].shape == (2, 32, 24, 1)
  assert batch["target"].shape == batch["y_mask"].shape == (2, 5)
  # A missing prior removes the prior head's supervision and blanks the prior image.
  for i in range(2):
    if not batch["has_prior"][i]:
      assert not batch["y_mask_prior"][i].any() and not batch["previous_image"][i].any()
  train = batching.train_iterator(
    examples, seed=0, global_batch_size=2, process_index=0, process_count=1
  )
  assert next(train)["current_image"].shape == (2, 32, 24, 1)


def test_sequence_pipeline_pads_to_a_fixed_length(tmp_path):
  from mammojax.data.pipelines.sequence import sequence_dataset

  plan = _sequence_plan(tmp_path)
  out = str(tmp_path / "out")
  ingest.write_dataset(plan, out, fingerprint="f", records_per_shard=8)
  examples = [sequence_dataset(out, "train", max_length=2)[i] for i in range(3)]
  by_length = sorted(examples, key=lambda e: int(e["sequence_mask"].sum()))
  first, _, last = by_length
  assert first["images"].shape == (2, 16, 16, 1)
  np.testing.assert_array_equal(first["sequence_mask"], [0, 1])  # left-padded, newest last
  assert not first["images"][0].any()
  # A 3-image sequence keeps its newest 2 images.
  np.testing.assert_array_equal(last["sequence_mask"], [1, 1])
  np.testing.assert_allclose(last["time_offsets"], [365 / 365.25, 0.0], atol=1e-6)
  assert int(last["length"]) == 2
