"""Decoding longitudinal records (synthetic or ingested) into model-ready examples."""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mammojax.data import records

# Record fields the risk models consume besides the two images.
LABEL_FIELDS = ("time_gap", "has_prior", "target", "y_mask", "target_prior", "y_mask_prior",
                "years_to_cancer", "years_to_followup", "density", "cancer_type")


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
      DecodeLongitudinal(config["pixel_mean"], config["pixel_std"]))
