"""TFDS builder for longitudinal mammography over the same preprocessing as ``mammojax.ingest``.

Put the longitudinal CSV (``meta.csv``, columns as in
:mod:`mammojax.data.ingest.longitudinal_csv`) and the images it names under the manual directory,
then::

  builder = MammojaxLongitudinal(config="default", data_dir=DATA)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=FILES))
  source = tfds.data_source("mammojax_longitudinal/default", data_dir=DATA)["train"]
  ds = grain.MapDataset.source(source)  # the same Grain pipeline as the ArrayRecord shards

Pixels are ``tfds.features.Tensor`` with ZLIB encoding (``tfds.features.Image`` needs TensorFlow
to encode PNG), and the files are ArrayRecord, so building and reading work without TensorFlow.
The record fields are those of ``mammojax.ingest --task=longitudinal``; the pixel normalisation
statistics of the training split are in ``builder.info.metadata`` (``pixel_mean``,
``pixel_std``). The pseudonymisation salt is ``salt.txt`` in the manual directory (created on the
first build); it never enters the dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np
import tensorflow_datasets as tfds

from mammojax.data.ingest import longitudinal_csv, tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig

CSV_NAME = "meta.csv"


@dataclasses.dataclass
class LongitudinalConfig(tfds.core.BuilderConfig):
  """Output size and pairing settings (see ``LongitudinalOptions``)."""

  height: int = 1024
  width: int = 832
  num_years: int = 5
  prior: str = "latest"
  min_gap_years: float = 0.0
  missing_prior: str = "keep"
  train_fraction: float = 0.7
  val_fraction: float = 0.1
  orientation: str = "laterality"
  split_seed: int = 0

  def options(self) -> longitudinal_csv.LongitudinalOptions:
    test = round(1.0 - self.train_fraction - self.val_fraction, 9)
    return longitudinal_csv.LongitudinalOptions(
      num_years=self.num_years,
      prior=self.prior,
      min_gap_years=self.min_gap_years,
      missing_prior=self.missing_prior,
      seed=self.split_seed,
      fractions=(("train", self.train_fraction), ("val", self.val_fraction), ("test", test)),
      preprocess=MammoPreprocessConfig(
        height=self.height, width=self.width, orientation=self.orientation
      ),
    )


class MammojaxLongitudinal(tfds.core.GeneratorBasedBuilder):
  """Current / prior mammogram pairs with cumulative risk targets."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Place {CSV_NAME} (longitudinal CSV) and the images it references (image_path column "
    "relative to this folder, or the <patient_id>_<L|R>_<view>_<YYYY-MM-DD>_<n>.png naming) in "
    "the manual directory."
  )
  BUILDER_CONFIGS = [
    LongitudinalConfig(name="default", description="1024x832, most recent prior"),
    LongitudinalConfig(
      name="small", height=256, width=208, description="256x208, most recent prior"
    ),
  ]

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    image = tfds.features.Tensor(
      shape=(c.height, c.width), dtype=np.uint16, encoding=tfds.features.Encoding.ZLIB
    )
    years = tfds.features.Tensor(shape=(c.num_years,), dtype=np.float32)
    scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)  # noqa: E731
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "current_image": image,
          "previous_image": image,
          "has_prior": scalar(np.int32),
          "time_gap": scalar(np.float32),
          "years_to_cancer": scalar(np.float32),
          "years_to_followup": scalar(np.float32),
          "target": years,
          "y_mask": years,
          "target_prior": years,
          "y_mask_prior": years,
          "density": scalar(np.int32),
          "cancer_type": scalar(np.int32),
          "exam_index": scalar(np.int32),
          "patient_hash": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual = str(dl_manager.manual_dir)
    csv_path = os.path.join(manual, CSV_NAME)
    salt, new = tabular.load_salt(manual, None)
    plan = longitudinal_csv.plan(csv_path, manual, self.builder_config.options(), salt)
    if new:
      tabular.store_salt(manual, salt)
    for error in plan.errors:
      logging.warning("skipped %s (%s): %s", error.rows, error.file, error.reason)
    self._stats = np.zeros(3)
    return {
      name: self._generate_examples(items, name == "train")
      for name, items in plan.splits.items()
      if items
    }

  def _generate_examples(self, items, is_train: bool):
    for item in items:
      status, payload = tabular.run_item(item)
      if status == "error":
        logging.warning("skipped %s (%s): %s", payload.rows, payload.file, payload.reason)
        continue
      if is_train:
        pixels = payload["current_image"]
        self._stats += (
          pixels.size,
          np.sum(pixels, dtype=np.float64),
          np.sum(np.square(pixels, dtype=np.float64)),
        )
        n, s, ss = self._stats
        self.info.metadata["pixel_mean"] = s / n
        self.info.metadata["pixel_std"] = math.sqrt(max(ss / n - (s / n) ** 2, 0.0))
      yield (
        f"{item.order[0]}-{item.order[1]}",
        {k: (v.item() if isinstance(v, np.generic) else v) for k, v in payload.items()},
      )
