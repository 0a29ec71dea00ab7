"""The synthetic multi-contrast brain volumes: deterministic, in the volume ingest's record and
manifest format (checked against a real ingest of the raw volumes saved as NIfTI), ADC and trace
always acquired, missing contrasts zero, and infarcts bright on trace and dark on ADC."""

import csv
import json
import os

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from mammojax.data import records
from mammojax.data.ingest import volume_csv
from mammojax.data.synthetic import brain_volumes
from mammojax.data.synthetic.image_files import write_nifti

SMALL = brain_volumes.SyntheticVolumeSpec(num_train=3, num_val=1, num_test=1, size=(16, 16, 16))


def _all_examples(spec):
  return [
    brain_volumes.generate_example(spec, split, i)
    for split in ("train", "val", "test")
    for i in range(spec.count(split))
  ]


def test_regeneration_is_byte_identical_and_atomic(tmp_path):
  first = brain_volumes.write_dataset(str(tmp_path / "a"), SMALL)
  second = brain_volumes.write_dataset(str(tmp_path / "b"), SMALL)
  assert os.path.basename(first) == f"synthetic_volumes_{SMALL.fingerprint()}"
  one, two = records.read_manifest(first), records.read_manifest(second)
  assert one == two
  for entry in one["splits"].values():
    for name in entry["shards"]:
      assert records.file_sha256(os.path.join(first, name)) == entry["sha256"][name]
  assert sorted(os.listdir(tmp_path / "a")) == [os.path.basename(first)]  # no temporary left
  stamp = os.stat(os.path.join(first, records.MANIFEST)).st_mtime_ns
  assert brain_volumes.write_dataset(str(tmp_path / "a"), SMALL) == first  # reused as it is
  assert os.stat(os.path.join(first, records.MANIFEST)).st_mtime_ns == stamp
  other = brain_volumes.SyntheticVolumeSpec(**{**SMALL.__dict__, "seed": 1})
  assert other.fingerprint() != SMALL.fingerprint()
  a, b = (brain_volumes.generate_example(s, "train", 0)["volume"] for s in (SMALL, other))
  assert not np.array_equal(a, b)


def test_records_equal_a_real_volume_ingest_of_the_raw_volumes(tmp_path):
  spec = brain_volumes.SyntheticVolumeSpec(
    num_train=3, num_val=0, num_test=0, size=(16, 16, 16), missing_probability=0.5, seed=3
  )
  rows, expected = [], {}
  for i in range(spec.count("train")):
    raw, present, mask = brain_volumes.raw_subject(spec, "train", i)
    row = {"subject": f"s{i}"}
    for c, name in enumerate(spec.contrasts):
      row[name] = f"s{i}_{name}.nii.gz" if present[c] else ""
      if present[c]:  # NIfTI arrays are [X, Y, Z]; the reader turns them to [D, H, W]
        write_nifti(str(tmp_path / row[name]), raw[..., c].transpose(2, 1, 0))
    row["mask"] = f"s{i}_mask.nii.gz"
    write_nifti(str(tmp_path / row["mask"]), mask.transpose(2, 1, 0).astype(np.float32))
    rows.append(row)
    expected[f"line {i + 2}"] = brain_volumes.generate_example(spec, "train", i)
  assert any(not all(r.values()) for r in rows)  # some contrast is missing
  with open(tmp_path / "meta.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  options = volume_csv.VolumeOptions(
    size=spec.size, contrasts=spec.contrasts, fractions=(("train", 1.0),)
  )
  plan = volume_csv.plan(str(tmp_path / "meta.csv"), str(tmp_path), options, salt="s")
  assert not plan.errors and len(plan.splits["train"]) == 3
  for item in plan.splits["train"]:
    ingested, synthetic = item.build(), expected[item.rows]
    assert set(ingested) == set(synthetic)
    for key, value in ingested.items():
      if key == "subject_hash":
        assert isinstance(synthetic[key], str) and len(synthetic[key]) == len(value)
        continue
      assert np.asarray(synthetic[key]).dtype == np.asarray(value).dtype, key
      np.testing.assert_array_equal(synthetic[key], value, err_msg=key)

  from mammojax import ingest  # the command's writer: its manifest keys

  ingest.write_dataset(plan, str(tmp_path / "ingested"), fingerprint="f")
  ingested = records.read_manifest(str(tmp_path / "ingested"))
  written = records.read_manifest(brain_volumes.write_dataset(str(tmp_path / "synthetic"), spec))
  assert set(ingested["config"]) <= set(written["config"])
  for key in ("task", "contrasts", "size", "has_mask", "volume_dtype"):
    assert written["config"][key] == ingested["config"][key], key
  assert set(written["splits"]["train"]) == set(ingested["splits"]["train"])


def test_trace_and_adc_always_present_missing_contrasts_zero():
  spec = brain_volumes.SyntheticVolumeSpec(size=(16, 16, 16))
  examples = _all_examples(spec)
  present = np.stack([e["contrast_present"] for e in examples])
  assert present[:, [spec.contrasts.index("ADC"), spec.contrasts.index("TRACE")]].all()
  assert 0 < present.mean() < 1  # some optional contrast is missing, most are acquired
  for e in examples:
    assert e["volume"].dtype == np.float16 and e["volume"].shape == (16, 16, 16, 7)
    assert e["mask"].dtype == np.uint8 and e["has_mask"] == 1
    assert e["contrast_present"].dtype == np.int32
    for c, acquired in enumerate(e["contrast_present"]):
      channel = e["volume"][..., c].astype(np.float32)
      if not acquired:
        assert not channel.any()
        continue
      values = channel[channel != 0]  # z-scored over its non-zero voxels, as the ingest does
      assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02
  assert len({e["subject_hash"] for e in examples}) == len(examples)


def test_infarcts_are_bright_on_trace_dark_on_adc_and_faint_on_t1_gre_swi():
  spec = brain_volumes.SyntheticVolumeSpec(size=(24, 24, 24), missing_probability=0.0)
  index = {name: c for c, name in enumerate(spec.contrasts)}
  examples = _all_examples(spec)
  empty = [e for e in examples if not e["mask"].any()]
  assert empty and len(empty) < len(examples) / 2  # some subjects have no lesion
  contrast = {name: [] for name in spec.contrasts}
  for e in examples:
    lesion = e["mask"].astype(bool)
    if not lesion.any():
      continue
    assert set(np.unique(e["mask"])) == {0, 1}
    volume = e["volume"].astype(np.float32)
    head = np.any(volume != 0, axis=-1)
    assert head[lesion].all()
    trace, adc = volume[..., index["TRACE"]], volume[..., index["ADC"]]
    assert trace[lesion].mean() > trace[head].mean() + 1.0
    assert adc[lesion].mean() <= adc[head].mean()
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & head
    for name, c in index.items():
      contrast[name].append(volume[..., c][lesion].mean() - volume[..., c][shell].mean())
  mean = {name: float(np.mean(v)) for name, v in contrast.items()}
  assert mean["TRACE"] > 1.5 and mean["ADC"] < -0.2
  assert 0 < mean["T2"] < mean["TRACE"] and 0 < mean["FLAIR"] < mean["TRACE"]
  for name in ("T1", "GRE", "SWI"):
    assert abs(mean[name]) < 0.25 * mean["TRACE"], mean


def test_manifest_and_dataset_dir_from_a_config(tmp_path):
  data = ml_collections.ConfigDict(
    {
      "dir": "",
      "contrasts": ("TRACE", "ADC"),  # the task's channels, not the generated vocabulary
      "synthetic": {"root": str(tmp_path), "size": [16, 16, 16], "num_train": 2, "num_val": 1},
    }
  )
  data.synthetic.num_test = 1
  directory = brain_volumes.dataset_dir(data)
  assert os.path.dirname(directory) == str(tmp_path)
  with open(os.path.join(directory, records.MANIFEST)) as f:
    manifest = json.load(f)
  config = manifest["config"]
  assert config["task"] == "volume" and config["contrasts"] == list(brain_volumes.CONTRASTS)
  assert config["size"] == [16, 16, 16] and config["volume_dtype"] == "float16"
  assert config["has_mask"] is True and config["classes"] == ["background", "infarct"]
  assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
  data.dir = "/some/ingested"
  assert brain_volumes.dataset_dir(data) == "/some/ingested"


def test_spec_refuses_a_vocabulary_without_trace():
  with pytest.raises(ValueError, match="TRACE"):
    brain_volumes.SyntheticVolumeSpec(contrasts=("ADC", "T2"))
  with pytest.raises(ValueError, match="unknown"):
    brain_volumes.SyntheticVolumeSpec(contrasts=("ADC", "TRACE", "DTI"))
