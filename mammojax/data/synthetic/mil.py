"""Synthetic mammograms with masses and calcification clusters, for multiple-instance learning.

Each example is one breast image with image-level labels and lesion boxes, written through the
same ArrayRecord + Grain path and with the same record fields as the VinDr-style ingestion
(:mod:`mammojax.data.ingest.mil_csv`):

- anatomy: the breast model of :mod:`mammojax.data.synthetic.anatomy` (half ellipse against
  the chest wall at the left edge, skin falloff, fibroglandular texture following a density 1-4);
- a mass is a dense blob with a lobulated margin (radius ``mass_radius`` pixels);
- a calcification finding is a cluster of ``calc_spots`` small bright spots within
  ``calc_cluster_radius`` pixels of a centre; negatives may carry one isolated bright spot, which
  is not a finding (only clusters count), so a single bright pixel does not give the label away;
- labels are drawn independently: ``labels = [mass, calcification]`` (the order of
  ``LABEL_NAMES``); every finding has a box ``(x0, y0, x1, y1)`` in pixels (x = column,
  y = row, exclusive upper corner) and a ``box_labels`` entry naming its label index.

Everything is a deterministic function of ``(seed, split, index)``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
from scipy import ndimage

from mammojax.data.constants import SPLITS
from mammojax.data.synthetic import anatomy as anatomy_lib
from mammojax.data.synthetic.splits import SplitCounts, write_splits

LABEL_NAMES = ("Mass", "Suspicious_Calcification")


@dataclasses.dataclass(frozen=True)
class SyntheticMILSpec(SplitCounts):
  """What to generate. ``image_size`` is (H, W) pixels; counts are examples per split."""

  image_size: tuple[int, int] = (256, 192)
  num_train: int = 512
  num_val: int = 128
  num_test: int = 128
  mass_fraction: float = 0.4
  calc_fraction: float = 0.4
  mass_radius: tuple[float, float] = (7.0, 12.0)
  mass_contrast: float = 0.3
  calc_spots: tuple[int, int] = (6, 12)
  calc_cluster_radius: float = 9.0
  calc_contrast: float = 0.6
  seed: int = 0
  examples_per_shard: int = 256


def generate_example(spec: SyntheticMILSpec, split: str, index: int) -> dict:
  """One MIL record: image uint16 [H, W], labels float32 [2], boxes float32 [N, 4] (x0, y0, x1,
  y1 pixels), box_labels int32 [N], num_boxes, laterality, view, patient_hash."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
  height, width = spec.image_size
  density = int(rng.integers(1, 5))
  anatomy = anatomy_lib.breast_anatomy(rng, height, width, density)
  breast = anatomy > 0
  has_mass = rng.random() < spec.mass_fraction
  has_calc = rng.random() < spec.calc_fraction
  boxes, box_labels = [], []
  if has_mass:
    radius = rng.uniform(*spec.mass_radius)
    center = anatomy_lib.point_in(rng, breast)
    mass = anatomy_lib.blob(rng, breast, radius, spec.mass_contrast * rng.uniform(0.8, 1.2), center)
    anatomy = anatomy + mass
    boxes.append(_box_of(mass > 0.5 * mass.max()))
    box_labels.append(0)
  if has_calc:
    spots = _calcification_cluster(rng, breast, spec)
    anatomy = anatomy + spots
    boxes.append(_box_of(spots > 0.25 * spots.max(), margin=2))
    box_labels.append(1)
  elif rng.random() < 0.5:
    anatomy = anatomy + _spots(rng, breast, [anatomy_lib.point_in(rng, breast)], spec.calc_contrast)
  image = anatomy_lib.to_uint16(anatomy_lib.acquisition_noise(rng, anatomy))
  return {
    "image": image,
    "labels": np.asarray([has_mass, has_calc], np.float32),
    "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
    "box_labels": np.asarray(box_labels, np.int32),
    "num_boxes": np.int32(len(boxes)),
    "laterality": np.int32(0),
    "view": np.int32(int(rng.integers(0, 2))),
    "density": np.int32(density),
    "patient_hash": hashlib.sha256(
      f"synthetic-mil-{spec.seed}-{split}-{index}".encode()
    ).hexdigest(),
  }


def write_dataset(directory: str, spec: SyntheticMILSpec) -> str:
  """Writes all splits as ArrayRecord shards + manifest under ``directory/<fingerprint>``.

  Reuses a finished dataset with the same spec; returns the dataset directory.
  """
  return write_splits(
    directory,
    "synthetic_mil",
    spec,
    generate_example,
    image_key="image",
    task="mil",
    labels=list(LABEL_NAMES),
  )


def _calcification_cluster(
  rng: np.random.Generator, breast: np.ndarray, spec: SyntheticMILSpec
) -> np.ndarray:
  center = np.asarray(anatomy_lib.point_in(rng, breast))
  count = int(rng.integers(spec.calc_spots[0], spec.calc_spots[1] + 1))
  offsets = rng.normal(0.0, spec.calc_cluster_radius / 2.0, size=(count, 2))
  offsets = np.clip(offsets, -spec.calc_cluster_radius, spec.calc_cluster_radius)
  offsets[0] = 0.0  # The centre is inside the breast, so the cluster is never empty.
  return _spots(rng, breast, center + offsets, spec.calc_contrast)


def _spots(rng: np.random.Generator, breast: np.ndarray, centers, contrast: float) -> np.ndarray:
  """Small bright specks (about 2 pixels across) at ``centers`` (row, col), inside the breast."""
  impulses = np.zeros(breast.shape)
  for r, c in centers:
    r, c = int(round(r)), int(round(c))
    if 0 <= r < breast.shape[0] and 0 <= c < breast.shape[1]:
      impulses[r, c] += rng.uniform(0.7, 1.3)
  spots = ndimage.gaussian_filter(impulses, 0.7)
  spots *= contrast / (ndimage.gaussian_filter(np.pad([[1.0]], 3), 0.7).max())
  return np.where(breast, spots, 0.0)


def _box_of(mask: np.ndarray, margin: int = 0) -> list[float]:
  """(x0, y0, x1, y1) pixel box (exclusive upper corner) around the True pixels of ``mask``."""
  rows, cols = np.nonzero(mask)
  height, width = mask.shape
  return [
    float(max(cols.min() - margin, 0)),
    float(max(rows.min() - margin, 0)),
    float(min(cols.max() + 1 + margin, width)),
    float(min(rows.max() + 1 + margin, height)),
  ]
