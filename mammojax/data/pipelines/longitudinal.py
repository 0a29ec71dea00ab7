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


# Lesion boxes ``[N, 4]`` (x0, y0, x1, y1) of the current image and of the prior, where the
# records have them (the synthetic data does).
LESION_FIELDS = ("lesion_boxes", "prior_lesion_boxes")


class DecodeLongitudinal(grain.transforms.Map):
  """bytes -> {'current_image', 'previous_image': float32 [H, W, 1] normalised, labels...}.

  A missing prior (``has_prior == 0``) also removes the prior head's supervision. With
  ``lesion_boxes``, the :data:`LESION_FIELDS` of records that have them are kept (float32
  ``[N, 4]``), for attribution scores; training batches leave them out.
  """

  def __init__(self, pixel_mean: float, pixel_std: float, lesion_boxes: bool = False):
    self.pixel_mean = float(pixel_mean)
    self.pixel_std = float(pixel_std)
    self.lesion_boxes = lesion_boxes

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
    if self.lesion_boxes:
      for key in LESION_FIELDS:
        if key in record:
          out[key] = np.asarray(record[key], np.float32).reshape(-1, 4)
    return out


def longitudinal_dataset(
  directory: str, split: str, lesion_boxes: bool = False
) -> grain.MapDataset:
  """The decoded examples of one split of a longitudinal dataset directory (with the records'
  lesion boxes when ``lesion_boxes``, see :class:`DecodeLongitudinal`)."""
  manifest = records.read_manifest(directory)
  config = manifest["config"]
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
  return grain.MapDataset.source(source).map(
    DecodeLongitudinal(config["pixel_mean"], config["pixel_std"], lesion_boxes)
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
