"""The sequence pipeline the temporal tasks read: start/end padding with masks, per-image fields,
stored splits and patient-level resplits."""

import os
import pickle

import grain
import numpy as np
import pytest

from mammojax.data import records
from mammojax.data.pipelines.sequence import PadSequence, patient_splits, sequence_dataset
from mammojax.data.synthetic import brain_sequences as bs


def _record(length, label=1, size=4, masks=True):
  """Image t is filled with 10 * (t + 1); time offsets count down to 0."""
  images = np.stack([np.full((size, size), 10 * (t + 1), np.uint16) for t in range(length)])
  record = {
    "images": images,
    "time_offsets": np.arange(length - 1, -1, -1).astype(np.float32),
    "image_labels": np.arange(length, dtype=np.int32),
    "label": np.int32(label),
    "length": np.int32(length),
    "patient_hash": "p",
  }
  if masks:
    record["region_masks"] = np.ones((length, size, size), np.uint8)
  return record


def _write(directory, splits, config):
  os.makedirs(directory, exist_ok=True)
  entries = {}
  for split, rows in splits.items():
    name = records.shard_name(split, 0, 1)
    records.write_shard(os.path.join(directory, name), rows)
    entries[split] = {"shards": [name], "count": len(rows)}
  records.write_manifest(directory, entries, config)
  return directory


def test_start_padding_keeps_the_newest_images_last():
  pad = PadSequence(3, pixel_mean=5.0, pixel_std=2.0)
  long = pad.map(records.encode_example(_record(5)))
  np.testing.assert_array_equal(long["sequence_mask"], [1, 1, 1])
  np.testing.assert_allclose(long["images"][:, 0, 0, 0], [(v - 5) / 2 for v in (30, 40, 50)])
  np.testing.assert_array_equal(long["time_offsets"], [2, 1, 0])
  np.testing.assert_array_equal(long["image_labels"], [2, 3, 4])
  assert int(long["length"]) == 3 and int(long["label"]) == 1
  short = pad.map(_record(2))
  assert short["images"].shape == (3, 4, 4, 1) and short["images"].dtype == np.float32
  np.testing.assert_array_equal(short["sequence_mask"], [0, 1, 1])
  np.testing.assert_allclose(short["images"][:, 0, 0, 0], [0.0, 2.5, 7.5])
  assert not short["images"][0].any() and not short["region_masks"][0].any()
  assert short["region_masks"][1:].all() and short["region_masks"].dtype == np.uint8
  np.testing.assert_array_equal(short["time_offsets"], [0, 1, 0])
  np.testing.assert_array_equal(short["image_labels"], [0, 0, 1])
  assert short["image_labels"].dtype == np.int32 and short["sequence_mask"].dtype == np.int32
  assert int(short["length"]) == 2


def test_end_padding_puts_the_images_first():
  pad = PadSequence(4, pixel_mean=0.0, pixel_std=10.0, padding="end")
  short = pad.map(_record(2, masks=False))
  np.testing.assert_array_equal(short["sequence_mask"], [1, 1, 0, 0])
  np.testing.assert_allclose(short["images"][:, 0, 0, 0], [1, 2, 0, 0])
  np.testing.assert_array_equal(short["time_offsets"], [1, 0, 0, 0])
  assert "region_masks" not in short and "features" not in short
  long = pad.map(_record(6))
  np.testing.assert_allclose(long["images"][:, 0, 0, 0], [3, 4, 5, 6])
  np.testing.assert_array_equal(long["sequence_mask"], [1, 1, 1, 1])


def test_feature_records_are_padded_like_images():
  record = _record(2, masks=False)
  del record["images"]
  record["features"] = np.arange(6, dtype=np.float16).reshape(2, 3) + 1
  for padding, mask in (("start", [0, 0, 1, 1]), ("end", [1, 1, 0, 0])):
    out = PadSequence(4, 0.0, 1.0, padding).map(record)
    assert out["features"].shape == (4, 3) and out["features"].dtype == np.float32
    np.testing.assert_array_equal(out["sequence_mask"], mask)
    np.testing.assert_array_equal(out["features"][np.asarray(mask, bool)], record["features"])
    assert not out["features"][~np.asarray(mask, bool)].any() and "images" not in out


def test_bad_settings_name_the_field_and_the_fix():
  with pytest.raises(ValueError, match=r"data\.seq_len must be >= 1"):
    PadSequence(0, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"data\.padding.*'middle'"):
    PadSequence(2, 0.0, 1.0, padding="middle")


def test_missing_stored_split_names_the_directory_and_the_fix(tmp_path):
  directory = _write(str(tmp_path / "d"), {"train": [_record(2)], "test": [_record(1)]}, {})
  with pytest.raises(ValueError) as error:
    sequence_dataset(directory, "val", 2)
  message = str(error.value)
  assert directory in message and "['test', 'train']" in message
  assert "--fractions" in message and "data.split_seed" in message


def test_features_dataset_without_pixel_statistics_is_not_normalised(tmp_path):
  rows = []
  for length in (1, 3):
    r = _record(length, masks=False)
    del r["images"]
    r["features"] = np.full((length, 2), 7.0, np.float32)
    rows.append(r)
  directory = _write(str(tmp_path / "f"), {"train": rows}, {"task": "sequence"})
  examples = sequence_dataset(directory, "train", 2, padding="end")
  assert len(examples) == 2
  np.testing.assert_array_equal(examples[0]["features"], [[7, 7], [0, 0]])
  np.testing.assert_array_equal(examples[1]["features"], [[7, 7], [7, 7]])
  scaled = sequence_dataset(directory, "train", 2, normalisation=(1.0, 2.0))
  np.testing.assert_array_equal(scaled[0]["features"], [[0, 0], [7, 7]])  # features: never scaled


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
  spec = bs.SyntheticBrainSpec(image_size=(16, 16), num_patients=40, disease_fraction=0.5)
  return spec, bs.write_dataset(str(tmp_path_factory.mktemp("brain")), spec)


def test_stored_split_examples(brain):
  spec, directory = brain
  examples = sequence_dataset(directory, "val", 3)
  manifest = records.read_manifest(directory)
  assert len(examples) == manifest["splits"]["val"]["count"]
  for i in range(len(examples)):
    e = examples[i]
    assert e["images"].shape == (3, 16, 16, 1) and e["region_masks"].shape == (3, 16, 16)
    assert e["sequence_mask"][-1] == 1 and e["time_offsets"][-1] == 0.0
    assert int(e["sequence_mask"].sum()) == int(e["length"]) <= 3
  config = manifest["config"]
  raw = sequence_dataset(directory, "val", 3, normalisation=(0.0, 1.0))[0]
  real = examples[0]["sequence_mask"].astype(bool)
  np.testing.assert_allclose(
    examples[0]["images"][real],
    (raw["images"][real] - config["pixel_mean"]) / config["pixel_std"],
    rtol=1e-5,
    atol=1e-5,
  )
  # Grain worker processes receive the dataset pickled, its open sources dropped.
  np.testing.assert_array_equal(
    pickle.loads(pickle.dumps(examples))[0]["images"], examples[0]["images"]
  )


def _patient_labels(directory):
  """(stored split, index) -> (patient_hash, label), read directly."""
  out = {}
  for split in records.read_manifest(directory)["splits"]:
    source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
    for i in range(len(source)):
      r = records.decode_example(source[i])
      out[(split, i)] = (r["patient_hash"], int(r["label"]))
  return out


def test_resplit_keeps_patients_together_and_the_label_mix(brain):
  _, directory = brain
  fractions = (("train", 0.5), ("val", 0.25), ("test", 0.25))
  chosen = patient_splits(directory, fractions, seed=3)
  truth = _patient_labels(directory)
  pooled = [pair for pairs in chosen.values() for pair in pairs]
  assert sorted(pooled) == sorted(truth)  # every record exactly once
  owner = {}
  for split, pairs in chosen.items():
    for pair in pairs:
      assert owner.setdefault(truth[pair][0], split) == split  # no patient crosses splits
  patients = {p: label for p, label in truth.values()}
  for split, fraction in fractions:
    members = [p for p, s in owner.items() if s == split]
    assert abs(len(members) - fraction * 40) <= 1
    diseased = sum(patients[p] for p in members)
    assert abs(diseased - fraction * sum(patients.values())) <= 1
  assert patient_splits(directory, fractions, seed=3) == chosen
  assert patient_splits(directory, fractions, seed=4) != chosen
  stored_train = {patient for (split, _), (patient, _) in truth.items() if split == "train"}
  assert {truth[pair][0] for pair in chosen["train"]} != stored_train
  resplit = sequence_dataset(directory, "test", 2, resplit_seed=3, fractions=fractions)
  assert len(resplit) == len(chosen["test"])
  first = resplit[0]
  np.testing.assert_array_equal(first["label"], truth[chosen["test"][0]][1])
  with pytest.raises(ValueError, match="sum to 1"):
    patient_splits(directory, (("train", 0.5), ("test", 0.2)), seed=0)
