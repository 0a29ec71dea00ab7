"""Synthetic longitudinal brain MRI slices whose label lives in the change across visits.

A stand-in for the OASIS-3 slices of Temporal-GradCam: each synthetic patient has 1 to 6 visits,
each an axial-like 2-D slice (a bright elliptical skull ring, grey matter around brighter white
matter with a smooth texture, and two dark lateral ventricles near the centre). What the
generator models:

- between people: head size, aspect, rotation, translation, texture, the gyral outline and a
  baseline ventricle size with a wide spread (``ventricle_log_area_std``), so a big-ventricle
  healthy person looks like a diseased one on a single image;
- over time: ventricle area grows by a per-person rate, slowly for healthy patients (ageing,
  ``healthy_growth`` ~1 %/year) and clearly faster for disease patients (``disease_growth``,
  8-15 %/year), saturating smoothly at ``max_log_growth``; the ventricles widen more than they
  lengthen;
- per visit: scanner gain and offset, noise, and a small repositioning (shift and rotation).

One image is therefore ambiguous (ventricle area separates the classes only weakly) while the
growth between a patient's first and last visit separates them well. The number of visits and
the gaps between them come from a random stream independent of the label stream, so history
length does not depend on the label (in the reference data it nearly does: most healthy examples
have full histories, most disease examples one image).

Records are those ``python -m mammojax.ingest --task=sequence`` writes, one per image: the
image last, the same patient's earlier images before it (oldest first), plus ``region_masks``
uint8 [T, H, W] marking the ventricles of each image (the region whose change carries the
label, for scoring attribution maps). Splits ``train``/``val``/``test`` are by patient,
stratified by label.

Pretraining cohort (:func:`write_pretrain_dataset`): single images of *other* synthetic people
(their own random streams, never a cohort patient), as length-1 sequence records labelled by an
anatomical pretext task, the quantile bin (``pretrain_classes`` equally likely classes, 8 by
default) of the ventricle-to-head size drawn from ``pretrain_log_area`` (cut points from that
distribution; fine bins teach the backbone size differences as small as a few years' growth). It stands in for ImageNet
pretraining: a backbone trained on it learns ventricle size without seeing a cohort patient.

Everything is a deterministic function of ``(seed, patient index)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from scipy import ndimage, stats

from mammojax.data.ingest.tabular import stratified_patient_split
from mammojax.data.synthetic import anatomy as anatomy_lib
from mammojax.data.synthetic.splits import Fingerprinted, write_example_splits

# Independent random streams: np.random.default_rng([seed, stream, index, ...]).
_LABEL, _VISITS, _ANATOMY, _GROWTH, _ACQUISITION = 0, 1, 2, 3, 4
_PRETRAIN_ANATOMY, _PRETRAIN_ACQUISITION = 10, 11


@dataclasses.dataclass(frozen=True)
class SyntheticBrainSpec(Fingerprinted):
  """What to generate.

  Attributes:
    image_size: (H, W) pixels.
    num_patients: cohort size; each patient gives one record per visit.
    disease_fraction: probability that a patient has the disease (label 1); the default is the
      reference's patient imbalance (43 disease, 10 healthy).
    visit_probabilities: P(1 visit), P(2 visits), ...
    gap_years: (low, high) of the uniform gap between consecutive visits, years.
    fractions: the stored patient-level split, stratified by label.
    num_pretrain_images: size of the separate pretraining cohort (one image per person).
    pretrain_val_fraction: share of the pretraining images in its ``val`` split.
    ventricle_log_area_std: between-person std of the baseline ventricle area (natural log of
      the area relative to a typical head).
    disease_baseline_shift: mean log-area excess of disease patients at their first visit.
    healthy_growth: (low, high) uniform yearly log-area growth rate of healthy patients.
    disease_growth: (low, high) uniform yearly log-area growth rate of disease patients.
    max_log_growth: the growth saturates smoothly (tanh) at this log-area increase.
    pretrain_log_area: (mean, std) of the normal log ventricle area of pretraining people (wider
      than the cohort's baseline, to cover grown ventricles too).
    pretrain_classes: equally likely ventricle-size bins of the pretext task.
    gain: (low, high) uniform scanner intensity scale per visit.
    offset: (low, high) uniform scanner intensity offset per visit.
    noise_std: (low, high) uniform std of the Gaussian noise per visit.
    jitter_pixels: std of the per-visit repositioning shift (pixels); rotation within +-3 deg.
    seed: master seed.
    examples_per_shard: records per ArrayRecord shard.
  """

  image_size: tuple[int, int] = (64, 64)
  num_patients: int = 160
  disease_fraction: float = 43 / 53
  visit_probabilities: tuple[float, ...] = (0.3, 0.2, 0.15, 0.15, 0.1, 0.1)
  gap_years: tuple[float, float] = (0.5, 3.0)
  fractions: tuple[tuple[str, float], ...] = (("train", 0.6), ("val", 0.2), ("test", 0.2))
  num_pretrain_images: int = 1024
  pretrain_val_fraction: float = 0.2
  ventricle_log_area_std: float = 0.4
  disease_baseline_shift: float = 0.05
  healthy_growth: tuple[float, float] = (0.0, 0.02)
  disease_growth: tuple[float, float] = (0.08, 0.15)
  max_log_growth: float = 1.0
  pretrain_log_area: tuple[float, float] = (0.25, 0.5)
  pretrain_classes: int = 8
  gain: tuple[float, float] = (0.85, 1.15)
  offset: tuple[float, float] = (-0.03, 0.03)
  noise_std: tuple[float, float] = (0.01, 0.03)
  jitter_pixels: float = 1.0
  seed: int = 0
  examples_per_shard: int = 256


@dataclasses.dataclass(frozen=True)
class _Person:
  """One head's anatomy (normalised head coordinates: the skull's outer edge at radius 1)."""

  center: tuple[float, float]  # pixels (row, col)
  radii: tuple[float, float]  # pixels (rows, cols)
  angle: float  # radians
  skull: float  # skull thickness (normalised)
  brain_edge: np.ndarray  # [4] harmonics of the cortical outline
  white_edge: np.ndarray  # [4] harmonics of the grey/white boundary
  grey: float
  white: float
  texture: np.ndarray  # [H, W] smooth noise, std 1, indexed in normalised coordinates
  texture_amount: float
  ventricle_offsets: np.ndarray  # [2, 2] (row, col) offsets of the two ventricles
  ventricle_tilt: float  # radians, frontal horns diverge
  ventricle_bend: float


def patient_label(spec: SyntheticBrainSpec, index: int) -> int:
  """1 (disease) or 0 (healthy), from the label stream only."""
  return int(np.random.default_rng([spec.seed, _LABEL, index]).random() < spec.disease_fraction)


def visit_times(spec: SyntheticBrainSpec, index: int) -> np.ndarray:
  """float64 [V]: years since the first visit (0 first), from the visit stream only."""
  rng = np.random.default_rng([spec.seed, _VISITS, index])
  probabilities = np.asarray(spec.visit_probabilities, np.float64)
  count = 1 + int(rng.choice(len(probabilities), p=probabilities / probabilities.sum()))
  gaps = rng.uniform(*spec.gap_years, size=len(probabilities) - 1)[: count - 1]
  return np.concatenate([[0.0], np.cumsum(gaps)])


def patient_hash(spec: SyntheticBrainSpec, index: int, cohort: str = "brain") -> str:
  """The pseudonym of cohort patient ``index`` (``cohort="pretrain"``: pretraining person)."""
  return hashlib.sha256(f"synthetic-{cohort}-{spec.seed}-{index}".encode()).hexdigest()


def ventricle_log_areas(spec: SyntheticBrainSpec, index: int) -> np.ndarray:
  """float64 [V]: the log ventricle area (relative to a typical head) at each visit."""
  label = patient_label(spec, index)
  rng = np.random.default_rng([spec.seed, _GROWTH, index])
  baseline = rng.normal(spec.disease_baseline_shift * label, spec.ventricle_log_area_std)
  rate = rng.uniform(*(spec.disease_growth if label else spec.healthy_growth))
  growth = spec.max_log_growth * np.tanh(rate * visit_times(spec, index) / spec.max_log_growth)
  return baseline + growth


def generate_patient(spec: SyntheticBrainSpec, index: int) -> list[dict]:
  """The records of cohort patient ``index``, one per visit, oldest first.

  Record ``k``: images uint16 [k+1, H, W] (visit k last), region_masks uint8 [k+1, H, W],
  time_offsets float32 [k+1] (years before visit k), image_labels int32 [k+1], label int32,
  length int32, patient_hash str.
  """
  label = patient_label(spec, index)
  times = visit_times(spec, index)
  person = _draw_person(np.random.default_rng([spec.seed, _ANATOMY, index]), spec.image_size)
  images, masks = [], []
  for visit, log_area in enumerate(ventricle_log_areas(spec, index)):
    rng = np.random.default_rng([spec.seed, _ACQUISITION, index, visit])
    image, mask = _render(person, log_area, rng, spec)
    images.append(image)
    masks.append(mask)
  key = patient_hash(spec, index)
  out = []
  for k in range(len(times)):
    out.append(
      {
        "images": np.stack(images[: k + 1]),
        "time_offsets": (times[k] - times[: k + 1]).astype(np.float32),
        "image_labels": np.full(k + 1, label, np.int32),
        "label": np.int32(label),
        "length": np.int32(k + 1),
        "patient_hash": key,
        "region_masks": np.stack(masks[: k + 1]),
      }
    )
  return out


def pretrain_cut_points(spec: SyntheticBrainSpec) -> tuple[float, ...]:
  """The ``pretrain_classes - 1`` boundaries of equally likely bins of the pretraining log
  ventricle area distribution."""
  mean, std = spec.pretrain_log_area
  quantiles = np.arange(1, spec.pretrain_classes) / spec.pretrain_classes
  return tuple(float(mean + std * z) for z in stats.norm.ppf(quantiles))


def generate_pretrain_example(spec: SyntheticBrainSpec, index: int) -> dict:
  """Pretraining person ``index``: a length-1 sequence record labelled by ventricle-size bin."""
  rng = np.random.default_rng([spec.seed, _PRETRAIN_ANATOMY, index])
  person = _draw_person(rng, spec.image_size)
  log_area = rng.normal(*spec.pretrain_log_area)
  size_bin = int(np.searchsorted(pretrain_cut_points(spec), log_area))
  acquisition = np.random.default_rng([spec.seed, _PRETRAIN_ACQUISITION, index])
  image, mask = _render(person, log_area, acquisition, spec)
  return {
    "images": image[None],
    "time_offsets": np.zeros(1, np.float32),
    "image_labels": np.full(1, size_bin, np.int32),
    "label": np.int32(size_bin),
    "length": np.int32(1),
    "patient_hash": patient_hash(spec, index, "pretrain"),
    "region_masks": mask[None],
  }


def cohort_splits(spec: SyntheticBrainSpec) -> dict[str, list[int]]:
  """Split name -> its patient indices (ascending): by patient, stratified by label."""
  outcomes = {patient_hash(spec, i): patient_label(spec, i) for i in range(spec.num_patients)}
  assignment = stratified_patient_split(outcomes, dict(spec.fractions), spec.seed)
  return {
    name: [i for i in range(spec.num_patients) if assignment[patient_hash(spec, i)] == name]
    for name, _ in spec.fractions
  }


def write_dataset(root: str, spec: SyntheticBrainSpec) -> str:
  """Writes the cohort's splits once under ``root/synthetic_brain_<fingerprint>``; returns it."""

  def build() -> dict[str, list[dict]]:
    return {
      name: [r for i in patients for r in generate_patient(spec, i)]
      for name, patients in cohort_splits(spec).items()
    }

  return write_example_splits(
    root,
    "synthetic_brain",
    spec,
    build,
    _last_image_pixels,
    task="sequence",
    fingerprint=spec.fingerprint(),
  )


def write_pretrain_dataset(root: str, spec: SyntheticBrainSpec) -> str:
  """Writes the pretraining cohort (splits train/val) once under
  ``root/synthetic_brain_pretrain_<fingerprint>``; returns the directory."""

  def build() -> dict[str, list[dict]]:
    count = spec.num_pretrain_images
    num_val = int(round(count * spec.pretrain_val_fraction))
    examples = [generate_pretrain_example(spec, i) for i in range(count)]
    return {"train": examples[: count - num_val], "val": examples[count - num_val :]}

  return write_example_splits(
    root,
    "synthetic_brain_pretrain",
    spec,
    build,
    _last_image_pixels,
    task="sequence",
    fingerprint=spec.fingerprint(),
    pretext="ventricle_size_bin",
    cut_points=list(pretrain_cut_points(spec)),
  )


def _last_image_pixels(record: dict) -> np.ndarray:
  return record["images"][-1, ::2, ::2]


def _draw_person(rng: np.random.Generator, image_size: tuple[int, int]) -> _Person:
  height, width = image_size
  center = (
    height / 2 + rng.uniform(-2, 2) * height / 64,
    width / 2 + rng.uniform(-2, 2) * width / 64,
  )
  noise = rng.standard_normal((height, width))
  texture = ndimage.gaussian_filter(noise, 1.2 * height / 64, mode="wrap")
  return _Person(
    center=center,
    radii=(height * rng.uniform(0.40, 0.46), width * rng.uniform(0.31, 0.37)),
    angle=float(np.deg2rad(rng.uniform(-8, 8))),
    skull=rng.uniform(0.06, 0.09),
    brain_edge=np.concatenate([rng.uniform(0.005, 0.02, 2), rng.uniform(0, 2 * np.pi, 2)]),
    white_edge=np.concatenate([rng.uniform(0.02, 0.06, 2), rng.uniform(0, 2 * np.pi, 2)]),
    grey=rng.uniform(0.38, 0.46),
    white=rng.uniform(0.56, 0.66),
    texture=texture / (texture.std() + 1e-8),
    texture_amount=rng.uniform(0.015, 0.035),
    ventricle_offsets=rng.normal(0.0, 0.015, (2, 2)),
    ventricle_tilt=float(np.deg2rad(rng.uniform(6, 16))),
    ventricle_bend=rng.uniform(0.5, 1.5),
  )


def _render(
  person: _Person, log_area: float, rng: np.random.Generator, spec: SyntheticBrainSpec
) -> tuple[np.ndarray, np.ndarray]:
  """One visit's slice: (uint16 [H, W] image, uint8 [H, W] ventricle mask)."""
  height, width = spec.image_size
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  shift = np.clip(
    rng.normal(0.0, spec.jitter_pixels, 2), -3 * spec.jitter_pixels, 3 * spec.jitter_pixels
  )
  angle = person.angle + np.deg2rad(rng.uniform(-3, 3))
  dr = rows - person.center[0] - shift[0]
  dc = cols - person.center[1] - shift[1]
  y = (np.cos(angle) * dr + np.sin(angle) * dc) / person.radii[0]
  x = (-np.sin(angle) * dr + np.cos(angle) * dc) / person.radii[1]
  radius = np.hypot(y, x)
  theta = np.arctan2(y, x)
  pixel = 1.0 / min(person.radii)  # one pixel in normalised units

  def inside(edge: np.ndarray) -> np.ndarray:  # soft 0..1 step, one pixel wide
    return 1.0 / (1.0 + np.exp(np.clip(edge / pixel * 2.5, -50, 50)))

  b, w = person.brain_edge, person.white_edge
  brain_radius = (
    0.86 - person.skull + b[0] * np.sin(11 * theta + b[2]) + b[1] * np.sin(17 * theta + b[3])
  )
  white_radius = 0.62 + w[0] * np.sin(5 * theta + w[2]) + w[1] * np.sin(9 * theta + w[3])
  texture = ndimage.map_coordinates(
    person.texture, [(y * 0.5 + 0.5) * (height - 1), (x * 0.5 + 0.5) * (width - 1)], order=1
  )
  tissue = person.grey + (person.white - person.grey) * inside(radius - white_radius)
  tissue = tissue + person.texture_amount * texture
  midline = np.exp(-0.5 * (x / (0.6 * pixel)) ** 2) * (np.abs(y) > 0.35)
  tissue = tissue * (1.0 - 0.6 * midline)
  csf = 0.08
  brain = inside(radius - brain_radius)
  image = csf + (tissue - csf) * brain
  ventricles, mask = _ventricles(person, log_area, y, x, pixel)
  image = image + (csf - image) * ventricles
  skull = inside(radius - 1.0) * (1.0 - inside(radius - (1.0 - person.skull)))
  scalp = inside(radius - 1.06) * (1.0 - inside(radius - 1.0))
  image = image * inside(radius - (1.0 - person.skull)) + 0.9 * skull + 0.3 * scalp
  head = inside(radius - 1.06)
  image = image * rng.uniform(*spec.gain) + rng.uniform(*spec.offset) * head
  image = image + rng.normal(0.0, rng.uniform(*spec.noise_std), image.shape)
  return anatomy_lib.to_uint16(np.abs(image)), mask.astype(np.uint8)


def _ventricles(
  person: _Person, log_area: float, y: np.ndarray, x: np.ndarray, pixel: float
) -> tuple[np.ndarray, np.ndarray]:
  """Soft [H, W] ventricle occupancy and the hard mask; area ~ exp(log_area) * typical."""
  factor = math.exp(float(np.clip(log_area, -1.5, 1.8)))
  length, breadth = 0.24 * factor**0.3, 0.075 * factor**0.7
  soft = np.zeros_like(y)
  for k, side in enumerate((-1.0, 1.0)):
    cy = -0.04 + person.ventricle_offsets[k, 0]
    cx = side * (0.05 + breadth) + person.ventricle_offsets[k, 1]
    tilt = side * person.ventricle_tilt
    dy, dx = y - cy, x - cx
    u = np.cos(tilt) * dy + np.sin(tilt) * dx
    v = -np.sin(tilt) * dy + np.cos(tilt) * dx
    v = v - side * person.ventricle_bend * breadth * (u / length) ** 2  # crescent, open outwards
    distance = np.sqrt((u / length) ** 2 + (v / breadth) ** 2)
    edge = (distance - 1.0) * breadth
    soft = np.maximum(soft, 1.0 / (1.0 + np.exp(np.clip(edge / pixel * 2.5, -50, 50))))
  return soft, soft > 0.5
