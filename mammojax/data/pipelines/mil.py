"""Decoding MIL records (synthetic or ingested VinDr-style) into fixed-shape bags of patches, and
stored per-scale features (``python -m mammojax.extract_features``) into bags of instances.

Every example of a split has the same shapes so that bags batch together: an image yields all
patch positions of its (fixed) size; background patches are blanked and masked out
(``patch_mask`` False), ground-truth boxes are padded to ``max_boxes``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np

from mammojax.data import records
from mammojax.data.constants import default_data_root
from mammojax.data.pipelines import patching
from mammojax.data.specs import spec_from_config
from mammojax.data.synthetic import mil as synthetic_mil


@dataclasses.dataclass(frozen=True)
class PatchSettings:
  """Attributes:
  image_size: (H, W) every record's image must have.
  patch_size: patch side in pixels.
  overlap: fraction shared by neighbouring patches.
  min_foreground: patches with at most this breast fraction are background.
  background_threshold: breast = pixels above this fraction of the image maximum.
  channels: 1, or 3 (grey repeated) for RGB encoders such as Mammo-CLIP's.
  max_boxes: ground-truth boxes kept per image (padding with zeros).
  thumbnail_stride: the ``thumbnail`` field (for report overlays) takes every n-th pixel.
  """

  image_size: tuple[int, int]
  patch_size: int
  overlap: float = 0.0
  min_foreground: float = 0.0
  background_threshold: float = 0.05
  channels: int = 1
  max_boxes: int = 8
  thumbnail_stride: int = 1

  @property
  def num_patches(self) -> int:
    return len(patching.grid_coords(self.image_size, self.patch_size, self.overlap))


def label_index(manifest_config: dict[str, Any], label: str) -> int:
  """Position of ``label`` (e.g. 'Mass') in the dataset's ``labels`` vector."""
  names = list(manifest_config.get("labels", []))
  if label not in names:
    raise ValueError(
      f"label {label!r} is not in this dataset's labels {names}; set "
      "config.data.label to one of them"
    )
  return names.index(label)


def select_boxes(
  boxes: np.ndarray, box_labels: np.ndarray | None, label: int | None, max_boxes: int
) -> tuple[np.ndarray, np.ndarray, np.int32]:
  """Ground-truth boxes of ``label`` padded to ``max_boxes``.

  Args:
    boxes: [N, 4] (x0, y0, x1, y1) pixels.
    box_labels: [N] label index of each box, -1 where unknown (kept for every label); None when
      the dataset has no per-box labels (VinDr-style ingestion).
    label: keep the boxes of this label index; None keeps all.
    max_boxes: the padded length; extra boxes are dropped.

  Returns:
    ``(boxes [max_boxes, 4], box_labels [max_boxes] int32 (-1 unknown / padding), count)``.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  box_labels = (
    np.full(len(boxes), -1, np.int32)
    if box_labels is None
    else np.asarray(box_labels, np.int32).reshape(-1)
  )
  if label is not None:
    keep = (box_labels == label) | (box_labels < 0)
    boxes, box_labels = boxes[keep], box_labels[keep]
  boxes, box_labels = boxes[:max_boxes], box_labels[:max_boxes]
  padded = np.zeros((max_boxes, 4), np.float32)
  padded_labels = np.full(max_boxes, -1, np.int32)
  padded[: len(boxes)], padded_labels[: len(boxes)] = boxes, box_labels
  return padded, padded_labels, np.int32(len(boxes))


class DecodeMILPatches(grain.transforms.Map):
  """bytes -> {'patches': float32 [P, S, S, C] normalised, 'patch_mask': bool [P],
  'patch_coords': int32 [P, 2] (row, col), 'label': float32 [], 'labels': float32 [K],
  'boxes': float32 [max_boxes, 4] (x0, y0, x1, y1), 'box_labels': int32 [max_boxes],
  'num_boxes': int32, 'thumbnail': uint8 [H / t, W / t]}.

  ``label`` is the index of the target in ``labels``; ``filter_boxes`` keeps only its boxes.
  ``with_image`` adds the whole normalised image ``'image'`` float32 ``[H, W, C]`` the patches
  are cut from (for attribution maps over the image).
  """

  def __init__(
    self,
    settings: PatchSettings,
    pixel_mean: float,
    pixel_std: float,
    label: int,
    filter_boxes: bool = True,
    with_image: bool = False,
  ):
    self.settings = settings
    self.pixel_mean = float(pixel_mean)
    self.pixel_std = float(pixel_std)
    self.label = int(label)
    self.filter_boxes = filter_boxes
    self.with_image = with_image

  def map(self, data: bytes) -> dict[str, Any]:
    s = self.settings
    record = records.decode_example(data)
    raw = np.asarray(record["image"])
    if raw.shape != tuple(s.image_size):
      raise ValueError(
        f"record image has shape {raw.shape}, the config expects image_size "
        f"{tuple(s.image_size)}; every image of a MIL dataset must have one size"
      )
    image = (raw.astype(np.float32) - self.pixel_mean) / self.pixel_std
    fill = -self.pixel_mean / self.pixel_std  # normalised black
    foreground = raw > s.background_threshold * max(float(raw.max()), 1.0)
    kept = patching.extract_patches(
      image,
      s.patch_size,
      s.overlap,
      foreground=foreground,
      min_foreground=s.min_foreground,
      fill=fill,
    )
    grid = patching.grid_coords(s.image_size, s.patch_size, s.overlap)
    patches = np.full((len(grid), s.patch_size, s.patch_size), fill, np.float32)
    coords = np.zeros((len(grid), 2), np.int32)
    mask = np.zeros(len(grid), bool)
    n = len(kept.coords)
    patches[:n], coords[:n], mask[:n] = kept.patches, kept.coords, True
    boxes, box_labels, num_boxes = select_boxes(
      record.get("boxes", np.zeros((0, 4))),
      record.get("box_labels"),
      self.label if self.filter_boxes else None,
      s.max_boxes,
    )
    labels = np.asarray(record["labels"], np.float32).reshape(-1)
    thumb = raw[:: s.thumbnail_stride, :: s.thumbnail_stride].astype(np.float32)
    thumb = (255.0 * thumb / max(float(thumb.max()), 1.0)).astype(np.uint8)
    out = {
      "patches": np.repeat(patches[..., None], s.channels, axis=-1),
      "patch_mask": mask,
      "patch_coords": coords,
      "label": labels[self.label],
      "labels": labels,
      "boxes": boxes,
      "box_labels": box_labels,
      "num_boxes": num_boxes,
      "thumbnail": thumb,
    }
    if self.with_image:
      out["image"] = np.repeat(image[..., None], s.channels, axis=-1)
    return out


class DecodeMILFeatures(grain.transforms.Map):
  """bytes of a feature record -> {'features_<s>': float32 [P, h_s, w_s, F] per scale,
  'patch_mask', 'patch_coords', 'label', 'labels', 'boxes' (of the target label, padded),
  'box_labels', 'num_boxes', 'thumbnail'} (as :class:`DecodeMILPatches`)."""

  def __init__(self, scales: tuple[int, ...], label: int):
    self.scales = tuple(int(s) for s in scales)
    self.label = int(label)

  def map(self, data: bytes) -> dict[str, Any]:
    record = records.decode_example(data)
    out = {f"features_{s}": np.asarray(record[f"features_{s}"], np.float32) for s in self.scales}
    labels = np.asarray(record["labels"], np.float32).reshape(-1)
    stored = int(record["num_boxes"])
    max_boxes = len(record["boxes"])
    boxes, box_labels, num_boxes = select_boxes(
      record["boxes"][:stored], record["box_labels"][:stored], self.label, max_boxes
    )
    out.update(
      patch_mask=np.asarray(record["patch_mask"], bool),
      patch_coords=np.asarray(record["patch_coords"], np.int32),
      label=labels[self.label],
      labels=labels,
      boxes=boxes,
      box_labels=box_labels,
      num_boxes=num_boxes,
      thumbnail=np.asarray(record["thumbnail"], np.uint8),
    )
    return out


def patch_dataset(
  directory: str,
  split: str,
  settings: PatchSettings,
  label: str,
  filter_boxes: bool = True,
  with_image: bool = False,
) -> grain.MapDataset:
  """The decoded bags of patches of one split of an image dataset directory (with the whole
  image when ``with_image``, see :class:`DecodeMILPatches`)."""
  config = records.read_manifest(directory)["config"]
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
  return grain.MapDataset.source(source).map(
    DecodeMILPatches(
      settings,
      config["pixel_mean"],
      config["pixel_std"],
      label_index(config, label),
      filter_boxes,
      with_image,
    )
  )


def feature_dataset(directory: str, split: str, label: str) -> grain.MapDataset:
  """The decoded bags of stored features of one split (``extract_features`` output)."""
  config = records.read_manifest(directory)["config"]
  if config.get("kind") != "mil_features":
    raise ValueError(
      f"{directory} is not a feature dataset (kind={config.get('kind')!r}); "
      "write one with python -m mammojax.extract_features"
    )
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
  return grain.MapDataset.source(source).map(
    DecodeMILFeatures(tuple(config["scales"]), label_index(config, label))
  )


def label_counts(directory: str, split: str, label: str) -> tuple[int, int]:
  """(negatives, positives) of ``label`` in one split, read from the raw records."""
  config = records.read_manifest(directory)["config"]
  index = label_index(config, label)
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, split))
  positives = sum(
    int(np.asarray(records.decode_example(source[i])["labels"]).reshape(-1)[index] > 0.5)
    for i in range(len(source))
  )
  return len(source) - positives, positives


def synthetic_spec(data: ml_collections.ConfigDict) -> synthetic_mil.SyntheticMILSpec:
  """The generator settings of a config's ``data`` section (``data.synthetic``, plus
  ``image_size`` from ``data``)."""
  return spec_from_config(synthetic_mil.SyntheticMILSpec, data.synthetic, data)


def resolve_image_dir(data: ml_collections.ConfigDict) -> str:
  """``data.dir`` (an ingested MIL dataset), or the synthetic one, generated on first use."""
  if data.dir:
    return data.dir
  return synthetic_mil.write_dataset(
    data.synthetic.root or default_data_root(), synthetic_spec(data)
  )
