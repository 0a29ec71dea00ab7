"""Decoding longitudinal records (synthetic or ingested) into model-ready examples."""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from mammojax.data import records
from mammojax.data.constants import default_data_root
from mammojax.data.specs import spec_from_config
from mammojax.data.synthetic import longitudinal as synthetic_longitudinal

# Record fields the risk models consume besides the two images.
LABEL_FIELDS = (
  "time_gap",
  "has_prior",
  "target",
  "y_mask",
  "target_prior",
  "y_mask_prior",
  "years_to_cancer",
  "years_to_followup",
  "density",
  "cancer_type",
)


class DecodeLongitudinal(grain.transforms.Map):
  """bytes -> {'current_image', 'previous_image': float32 [H, W, 1] normalised, labels...}.

  A missing prior (``has_prior == 0``) also removes the prior head's supervision.
  """

  def __init__(self, pixel_mean: float, pixel_std: float):
    self.pixel_mean = float(pixel_mean)
    self.pixel_std = float(pixel_std)

  def map(self, data: bytes) -> dict[str, Any]:
    record = records.decode_example(data)
    out = {}
    for key in ("current_image", "previous_image"):
      image = (record[key].astype(np.float32) - self.pixel_mean) / self.pixel_std
      out[key] = image[..., None]
    for key in LABEL_FIELDS:
      out[key] = np.asarray(record[key])
    out["y_mask_prior"] = (out["y_mask_prior"] * out["has_prior"]).astype(np.float32)
    if not out["has_prior"]:
      out["previous_image"] = np.zeros_like(out["previous_image"])
    if "displacement" in record:
      out["displacement"] = record["displacement"].astype(np.float32)
    return out


def longitudinal_dataset(directory: str, split: str) -> grain.MapDataset:
  """The decoded examples of one split of a longitudinal dataset directory."""
  manifest = records.read_manifest(directory)
  config = manifest["config"]
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
  return grain.MapDataset.source(source).map(
    DecodeLongitudinal(config["pixel_mean"], config["pixel_std"])
  )


def synthetic_spec(
  data: ml_collections.ConfigDict,
) -> synthetic_longitudinal.SyntheticLongitudinalSpec:
  """The generator settings of a config's ``data`` section (``data.synthetic``, plus
  ``image_size`` and ``num_years`` from ``data``)."""
  return spec_from_config(synthetic_longitudinal.SyntheticLongitudinalSpec, data.synthetic, data)


def resolve_longitudinal_dir(data: ml_collections.ConfigDict) -> str:
  """``data.dir`` (an ingested dataset), or the synthetic dataset, generated on first use."""
  if data.dir:
    return data.dir
  root = data.synthetic.root or default_data_root()
  return synthetic_longitudinal.write_dataset(root, synthetic_spec(data))
