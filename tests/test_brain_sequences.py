"""The synthetic longitudinal brain set: deterministic records in the ingest --task=sequence
format, a label carried by change over visits rather than by one image, and history lengths
that do not leak the label."""

import dataclasses
import json
import os

import numpy as np
import pytest

from mammojax.data import records
from mammojax.data.synthetic import brain_sequences as bs

SMALL = bs.SyntheticBrainSpec(
  image_size=(32, 32), num_patients=12, disease_fraction=0.5, num_pretrain_images=60
)


def _read(directory, split):
  return [
    records.decode_example(r)
    for path in records.shard_paths(directory, split)
    for r in _array_records(path)
  ]


def _array_records(path):
  import grain

  source = grain.sources.ArrayRecordDataSource([path])
  return [source[i] for i in range(len(source))]


def _auc(scores, labels):
  """Mann-Whitney AUC with ties counted half."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  pos, neg = scores[labels == 1], scores[labels == 0]
  greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return greater / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
  spec = bs.SyntheticBrainSpec()
  directory = bs.write_dataset(str(tmp_path_factory.mktemp("brain")), spec)
  return spec, directory, {s: _read(directory, s) for s in ("train", "val", "test")}


def test_generation_is_deterministic_and_written_once(tmp_path):
  first = bs.write_dataset(str(tmp_path / "a"), SMALL)
  second = bs.write_dataset(str(tmp_path / "b"), SMALL)
  assert os.path.basename(first) == f"synthetic_brain_{SMALL.fingerprint()}"
  for split in ("train", "val", "test"):
    for a, b in zip(records.shard_paths(first, split), records.shard_paths(second, split)):
      assert records.file_sha256(a) == records.file_sha256(b)
  stamp = os.stat(os.path.join(first, records.MANIFEST)).st_mtime_ns
  assert bs.write_dataset(str(tmp_path / "a"), SMALL) == first  # reused, not rewritten
  assert os.stat(os.path.join(first, records.MANIFEST)).st_mtime_ns == stamp
  other = bs.write_dataset(str(tmp_path / "a"), bs.SyntheticBrainSpec(**{**vars(SMALL), "seed": 1}))
  assert other != first


def test_records_follow_the_sequence_format(default_set):
  spec, directory, splits = default_set
  with open(os.path.join(directory, records.MANIFEST)) as f:
    config = json.load(f)["config"]
  assert config["task"] == "sequence" and config["kind"] == "synthetic_brain"
  assert config["fingerprint"] == spec.fingerprint() and config["num_patients"] == 160
  assert 0 < config["pixel_mean"] and 0 < config["pixel_std"]
  by_patient = {}
  for split, rows in splits.items():
    for r in rows:
      t = int(r["length"])
      assert r["images"].shape == (t, 64, 64) and r["images"].dtype == np.uint16
      assert r["region_masks"].shape == (t, 64, 64) and r["region_masks"].dtype == np.uint8
      assert r["time_offsets"].dtype == np.float32 and r["time_offsets"][-1] == 0.0
      assert np.all(np.diff(r["time_offsets"]) < 0)  # oldest first
      np.testing.assert_array_equal(r["image_labels"], np.full(t, r["label"], np.int32))
      assert r["region_masks"].reshape(t, -1).sum(1).min() > 10
      by_patient.setdefault(r["patient_hash"], []).append((split, r))
  assert len(by_patient) == 160
  for rows in by_patient.values():
    assert len({s for s, _ in rows}) == 1  # a patient lives in one split
    full = rows[-1][1]
    for k, (_, r) in enumerate(rows):  # record k: the first k+1 images of the full history
      assert int(r["length"]) == k + 1
      np.testing.assert_array_equal(r["images"], full["images"][: k + 1])


def test_splits_are_by_patient_and_stratified(default_set):
  spec, _, splits = default_set
  labels = {s: [int(r["label"]) for r in rows if r["length"] == 1] for s, rows in splits.items()}
  sizes = [len(labels[s]) for s in ("train", "val", "test")]
  assert sum(sizes) == 160 and all(
    abs(n - f * 160) <= 1 for n, (_, f) in zip(sizes, spec.fractions)
  )
  overall = np.mean([v for s in labels.values() for v in s])
  for split_labels in labels.values():
    assert abs(np.mean(split_labels) - overall) < 0.04


def test_one_image_is_ambiguous_while_the_change_is_not(default_set):
  """Measured on the stored ventricle masks: area of one image vs its growth over visits."""
  _, _, splits = default_set
  rows = [r for s in splits.values() for r in s]
  single = _auc([r["region_masks"][-1].sum() for r in rows], [r["label"] for r in rows])
  histories = {}
  for r in rows:  # the longest record of each patient holds all its images
    if int(r["length"]) > int(histories.get(r["patient_hash"], {"length": 0})["length"]):
      histories[r["patient_hash"]] = r
  multi = [r for r in histories.values() if r["length"] >= 2]
  areas = [r["region_masks"].reshape(int(r["length"]), -1).sum(1) for r in multi]
  change = _auc([np.log(a[-1] / a[0]) for a in areas], [r["label"] for r in multi])
  assert 0.55 < single < 0.8, single
  assert change > 0.9 and change - single > 0.15, (single, change)


def test_history_length_does_not_depend_on_the_label():
  base = bs.SyntheticBrainSpec(image_size=(16, 16))
  flipped = bs.SyntheticBrainSpec(image_size=(16, 16), disease_fraction=0.2)
  assert [bs.patient_label(base, i) for i in range(40)] != [
    bs.patient_label(flipped, i) for i in range(40)
  ]
  for i in range(40):
    np.testing.assert_array_equal(bs.visit_times(base, i), bs.visit_times(flipped, i))
  for i in range(3):
    a, b = bs.generate_patient(base, i), bs.generate_patient(flipped, i)
    assert len(a) == len(b)
    np.testing.assert_array_equal(a[-1]["time_offsets"], b[-1]["time_offsets"])
  # One example per image: mean history length of each class's examples on a large cohort.
  large = bs.SyntheticBrainSpec(num_patients=4000, disease_fraction=0.5)
  lengths = {0: [], 1: []}
  for i in range(large.num_patients):
    lengths[bs.patient_label(large, i)].extend(range(1, len(bs.visit_times(large, i)) + 1))
  assert abs(np.mean(lengths[1]) - np.mean(lengths[0])) < 0.15
  gaps = np.concatenate([np.diff(bs.visit_times(large, i)) for i in range(200)])
  assert gaps.min() >= 0.5 and gaps.max() <= 3.0


def test_pretraining_cohort_is_other_people_labelled_by_ventricle_size_bin(tmp_path):
  spec = dataclasses.replace(SMALL, pretrain_classes=3)
  directory = bs.write_pretrain_dataset(str(tmp_path), spec)
  assert os.path.basename(directory).startswith("synthetic_brain_pretrain_")
  manifest = records.read_manifest(directory)
  assert sorted(manifest["splits"]) == ["train", "val"]
  assert manifest["config"]["task"] == "sequence"
  rows = _read(directory, "train") + _read(directory, "val")
  assert len(_read(directory, "val")) == 12 and len(rows) == 60
  cohort = {bs.patient_hash(spec, i) for i in range(spec.num_patients)}
  assert not cohort & {r["patient_hash"] for r in rows}
  for r in rows:
    assert r["images"].shape == (1, 32, 32) and int(r["length"]) == 1
    assert int(r["image_labels"][0]) == int(r["label"]) in (0, 1, 2)
  labels = np.asarray([int(r["label"]) for r in rows])
  area = np.asarray([r["region_masks"].sum() for r in rows])
  assert all(10 <= (labels == c).sum() <= 30 for c in range(3))
  medians = [np.median(area[labels == c]) for c in range(3)]
  assert medians[0] < medians[1] < medians[2]
