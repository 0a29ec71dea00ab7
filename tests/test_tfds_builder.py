"""TFDS builder over the ingestion preprocessing, read back without TensorFlow through Grain."""

import csv
import sys

import grain
import numpy as np
import pytest
from image_files import phantom, write_dicom, write_png

tfds = pytest.importorskip("tensorflow_datasets")

from mammojax.data import tfds_builder  # noqa: E402
from mammojax.data.ingest import longitudinal_csv  # noqa: E402
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig, load_mammogram  # noqa: E402


def test_builder_prepares_and_feeds_grain(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_png(str(manual / "a.png"), phantom(40, 32, "L", seed=1))
  write_png(str(manual / "b.png"), phantom(40, 32, "L", seed=2))
  write_dicom(str(manual / "c.dcm"), phantom(40, 32, "R", seed=3), laterality="R")
  columns = list(longitudinal_csv.REQUIRED_COLUMNS) + ["image_path"]
  rows = [
    ["P1", "e1", "L", "CC", 2018, "", 5, "2", "", "x", "a.png"],
    ["P1", "e2", "L", "CC", 2020, "", 3, "2", "", "x", "b.png"],
    ["P2", "e3", "R", "CC", 2020, "1", 2, "c", "DCIS", "x", "c.dcm"],
  ]
  with open(manual / tfds_builder.CSV_NAME, "w", newline="") as f:
    csv.writer(f).writerows([columns] + rows)
  config = tfds_builder.LongitudinalConfig(
    name="tiny", height=32, width=24, train_fraction=1.0, val_fraction=0.0
  )
  builder = tfds_builder.MammojaxLongitudinal(config=config, data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert "tensorflow" not in sys.modules
  source = builder.as_data_source(split="train")
  assert len(source) == 3
  examples = [grain.MapDataset.source(source)[i] for i in range(3)]
  by_prior = sorted(examples, key=lambda e: (int(e["has_prior"]), int(e["cancer_type"])))
  assert [int(e["has_prior"]) for e in by_prior] == [0, 0, 1]
  assert by_prior[1]["cancer_type"] == 2 and by_prior[1]["density"] == 3
  np.testing.assert_array_equal(by_prior[1]["target"], [1, 1, 1, 1, 1])
  # Same pixels as the ingestion path for the same file and settings.
  expected = load_mammogram(str(manual / "b.png"), "L", MammoPreprocessConfig(height=32, width=24))[
    0
  ]
  np.testing.assert_array_equal(by_prior[2]["current_image"], expected)
  assert by_prior[2]["current_image"].dtype == np.uint16
  assert by_prior[2]["time_gap"] == pytest.approx(2.0)
  mean = np.mean([e["current_image"].astype(np.float64).mean() for e in examples])
  assert builder.info.metadata["pixel_mean"] == pytest.approx(mean)
  by_name = tfds.data_source("mammojax_longitudinal/tiny", data_dir=str(tmp_path / "data"))
  assert len(by_name["train"]) == 3
  reloaded = tfds.builder_from_directory(builder.data_dir)
  assert reloaded.info.metadata["pixel_mean"] == pytest.approx(mean)
  salt = (manual / "salt.txt").read_text().strip()
  assert all(
    salt.encode() not in p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file()
  )
