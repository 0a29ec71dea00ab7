"""Synthetic current/prior mammogram pairs with cumulative-risk labels.

Each example is one patient's current exam and a prior exam of the same breast, written through
the same ArrayRecord + Grain path as ingested real data (same record fields, see
``mammojax.ingest``). What the generator models:

- anatomy (:mod:`mammojax.data.synthetic.anatomy`): a breast-shaped half ellipse against the
  chest wall (left edge), skin falloff, and fibroglandular texture (band-passed noise, streaks
  towards the nipple) whose amount follows the BI-RADS density (1-4);
- the prior is the same anatomy imaged under a different positioning/compression: a smooth
  random deformation (small affine + low-frequency field) relates the two, and the ground-truth
  displacement is recorded (``displacement`` ``[H, W, 2]`` pixels 'ij', such that
  ``prior(x + u(x))`` lines up with ``current(x)``), together with a global intensity change;
- findings: every breast may carry stable benign densities (present in both exams); positive
  cases get a lesion that is new (absent in the prior) or grows, larger the sooner the cancer is
  diagnosed. A lesion therefore looks like a benign density on the current image alone; it is
  the change against the aligned prior that marks it. Its box is recorded in both frames
  (``lesion_boxes``: the current lesion; ``prior_lesion_boxes``: the same place seen in the
  prior, where the lesion is smaller or not yet visible), ``[1, 4]`` ``(x0, y0, x1, y1)`` pixels,
  upper corner exclusive, zeros (covering nothing) without a lesion or without a prior.
- labels: years to cancer (positives within the horizon) or a censored follow-up (negatives),
  turned into cumulative targets and masks by :mod:`mammojax.data.survival`, for the current
  exam and for the prior (whose horizon is shifted by the time gap).

Everything is a deterministic function of ``(seed, split, index)``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
from scipy import ndimage

from mammojax.data.constants import NO_CANCER_YEARS, SPLITS
from mammojax.data.survival import survival_targets
from mammojax.data.synthetic import anatomy as anatomy_lib
from mammojax.data.synthetic.splits import SplitCounts, write_splits


@dataclasses.dataclass(frozen=True)
class SyntheticLongitudinalSpec(SplitCounts):
  """What to generate. ``image_size`` is (H, W); counts are examples per split."""

  image_size: tuple[int, int] = (128, 96)
  num_train: int = 512
  num_val: int = 128
  num_test: int = 128
  num_years: int = 5
  positive_fraction: float = 0.3
  missing_prior_fraction: float = 0.0
  deformation_pixels: float = 4.0
  lesion_contrast: float = 0.35
  store_displacement: bool = False
  seed: int = 0
  examples_per_shard: int = 256


def generate_example(spec: SyntheticLongitudinalSpec, split: str, index: int) -> dict:
  """One longitudinal record (the fields ``mammojax.ingest`` writes for real data)."""
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
  height, width = spec.image_size
  density = int(rng.integers(1, 5))
  anatomy = anatomy_lib.breast_anatomy(rng, height, width, density)
  breast_mask = anatomy > 0

  positive = rng.random() < spec.positive_fraction
  if positive:
    years_to_cancer = float(rng.integers(0, spec.num_years))
    years_to_followup = years_to_cancer + float(rng.integers(0, 3))
    cancer_type = int(rng.integers(1, 3))  # 1 invasive, 2 DCIS
  else:
    years_to_cancer = NO_CANCER_YEARS
    years_to_followup = float(rng.integers(1, spec.num_years + 3))
    cancer_type = 0
  time_gap = float(np.round(rng.uniform(0.8, 3.0), 2))

  # Stable benign densities: same place in both exams (drawn in the prior's anatomy frame).
  for _ in range(int(rng.integers(0, 3))):
    anatomy += anatomy_lib.blob(
      rng,
      breast_mask,
      radius=rng.uniform(2.0, 5.0),
      contrast=spec.lesion_contrast * rng.uniform(0.7, 1.3),
    )
  current_anatomy = anatomy.copy()
  prior_anatomy = anatomy
  lesion = np.zeros((height, width), bool)  # the current lesion, in the anatomy's frame
  if positive:
    # Sooner cancer -> larger lesion now; in the prior it is absent or smaller.
    radius_now = 6.0 - 0.9 * years_to_cancer + rng.uniform(-0.5, 0.5)
    grows = rng.random() < 0.4
    center = anatomy_lib.point_in(rng, breast_mask)
    mass = anatomy_lib.blob(rng, breast_mask, radius_now, spec.lesion_contrast, center)
    current_anatomy = current_anatomy + mass
    # The blob's margin is a logistic step whose midpoint (half the contrast) is its edge.
    lesion = mass > 0.5 * spec.lesion_contrast
    if grows:
      prior_anatomy = prior_anatomy + anatomy_lib.blob(
        rng, breast_mask, radius_now * 0.45, spec.lesion_contrast, center
      )

  displacement = _smooth_deformation(rng, height, width, spec.deformation_pixels)
  # current(x) = anatomy(x); prior is the anatomy seen through the inverse positioning, so that
  # prior(x + u(x)) ~= anatomy(x). We build the prior by pulling back with the inverse field,
  # approximated by -u(x - u(x)) (accurate for the small, smooth fields used here).
  grid = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij"), -1)
  back = grid - displacement
  inverse = -np.stack(
    [
      ndimage.map_coordinates(
        displacement[..., c], [back[..., 0], back[..., 1]], order=1, mode="nearest"
      )
      for c in range(2)
    ],
    -1,
  )
  pulled = grid + inverse
  prior_img = ndimage.map_coordinates(
    prior_anatomy, [pulled[..., 0], pulled[..., 1]], order=1, mode="constant", cval=0.0
  )
  prior_lesion = (
    ndimage.map_coordinates(lesion.astype(np.float64), [pulled[..., 0], pulled[..., 1]], order=1)
    > 0.5
  )
  gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)
  prior_img = np.where(prior_img > 0, prior_img * gain + offset, 0.0)

  current = anatomy_lib.to_uint16(anatomy_lib.acquisition_noise(rng, current_anatomy))
  prior = anatomy_lib.to_uint16(anatomy_lib.acquisition_noise(rng, prior_img))
  has_prior = int(rng.random() >= spec.missing_prior_fraction)
  if not has_prior:
    prior = np.zeros_like(prior)

  target, mask = survival_targets(years_to_cancer, years_to_followup, spec.num_years)
  prior_ytc = years_to_cancer if not positive else years_to_cancer + np.ceil(time_gap)
  target_prior, mask_prior = survival_targets(
    prior_ytc, years_to_followup + np.ceil(time_gap), spec.num_years
  )
  example = {
    "current_image": current,
    "previous_image": prior,
    "has_prior": np.int32(has_prior),
    "time_gap": np.float32(time_gap if has_prior else 0.0),
    "years_to_cancer": np.float32(years_to_cancer),
    "years_to_followup": np.float32(years_to_followup),
    "target": target,
    "y_mask": mask,
    "target_prior": target_prior,
    "y_mask_prior": mask_prior,
    "density": np.int32(density),
    "cancer_type": np.int32(cancer_type),
    "patient_hash": hashlib.sha256(f"synthetic-{spec.seed}-{split}-{index}".encode()).hexdigest(),
    "exam_index": np.int32(index),
    "lesion_boxes": bounding_box(lesion)[None],
    "prior_lesion_boxes": bounding_box(prior_lesion & bool(has_prior))[None],
  }
  if spec.store_displacement:
    example["displacement"] = displacement.astype(np.float32)
  return example


def bounding_box(mask: np.ndarray) -> np.ndarray:
  """The box ``(x0, y0, x1, y1)`` float32 of a mask ``[H, W]`` (x = column, upper corner
  exclusive, as :func:`mammojax.interpret.scoring.boxes_to_mask` reads it); zeros when empty."""
  rows, cols = np.nonzero(mask)
  if rows.size == 0:
    return np.zeros(4, np.float32)
  return np.asarray([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def write_dataset(directory: str, spec: SyntheticLongitudinalSpec) -> str:
  """Writes all splits as ArrayRecord shards + manifest under ``directory/<fingerprint>``.

  Reuses a finished dataset with the same spec; returns the dataset directory.
  """
  return write_splits(
    directory, "synthetic_longitudinal", spec, generate_example, image_key="current_image"
  )


def _smooth_deformation(
  rng: np.random.Generator, height: int, width: int, magnitude: float
) -> np.ndarray:
  """A positioning/compression change: small affine plus a low-frequency field, pixels 'ij'."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  rc, cc = rows - height / 2, cols - width / 2
  angle = np.deg2rad(rng.uniform(-3, 3))
  scale = 1.0 + rng.uniform(-0.04, 0.04, size=2)
  shift = rng.uniform(-0.5, 0.5, size=2) * magnitude
  affine_r = (np.cos(angle) * scale[0] - 1) * rc - np.sin(angle) * cc + shift[0]
  affine_c = np.sin(angle) * rc + (np.cos(angle) * scale[1] - 1) * cc + shift[1]
  coarse = rng.standard_normal((2, 4, 4))
  field = np.stack(
    [ndimage.zoom(coarse[c], (height / 4, width / 4), order=3)[:height, :width] for c in range(2)],
    -1,
  )
  field *= magnitude / (np.abs(field).max() + 1e-8)
  return np.stack([affine_r, affine_c], -1) + field
