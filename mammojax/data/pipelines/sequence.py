"""Decoding sequence records (``mammojax.ingest --task=sequence``) into fixed-length examples.

Scaffolding for a coming system: the Temporal-GradCam model that reads these examples is not
implemented yet, so no task uses this pipeline today.

A patient's image sequence has a variable length ``T``; batches need one shape. Sequences are
left-padded to ``max_length`` (the newest image stays last, at index ``max_length - 1``) and a
``sequence_mask`` marks the real images, so temporal models attend to real images only.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mammojax.data import records

PER_IMAGE_FIELDS = ("images", "time_offsets", "image_labels")


class PadSequence(grain.transforms.Map):
  """bytes -> {'images' float32 [L, H, W, 1] normalised, 'time_offsets' [L], 'image_labels' [L],
  'sequence_mask' [L] (1 = real image), 'label', 'length'}; sequences longer than ``max_length``
  keep their newest ``max_length`` images."""

  def __init__(self, max_length: int, pixel_mean: float, pixel_std: float):
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    self.max_length = int(max_length)
    self.pixel_mean = float(pixel_mean)
    self.pixel_std = float(pixel_std)

  def map(self, data: bytes) -> dict[str, Any]:
    record = records.decode_example(data)
    length = int(record["length"])
    keep = min(length, self.max_length)
    pad = self.max_length - keep
    out: dict[str, Any] = {}
    for key in PER_IMAGE_FIELDS:
      values = np.asarray(record[key])[length - keep : length]
      widths = [(pad, 0)] + [(0, 0)] * (values.ndim - 1)
      out[key] = np.pad(values, widths)
    images = (out["images"].astype(np.float32) - self.pixel_mean) / self.pixel_std
    out["images"] = np.where(_mask(pad, keep)[:, None, None], images, 0.0)[..., None]
    out["time_offsets"] = out["time_offsets"].astype(np.float32)
    out["image_labels"] = out["image_labels"].astype(np.int32)
    out["sequence_mask"] = _mask(pad, keep).astype(np.int32)
    out["label"] = np.int32(record["label"])
    out["length"] = np.int32(keep)
    return out


def sequence_dataset(directory: str, split: str, max_length: int) -> grain.MapDataset:
  """The padded examples of one split of an ingested sequence dataset."""
  config = records.read_manifest(directory)["config"]
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
  return grain.MapDataset.source(source).map(
    PadSequence(max_length, config.get("pixel_mean", 0.0), config.get("pixel_std", 1.0))
  )


def _mask(pad: int, keep: int) -> np.ndarray:
  return np.concatenate([np.zeros(pad, bool), np.ones(keep, bool)])
