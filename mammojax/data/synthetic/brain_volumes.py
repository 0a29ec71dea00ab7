"""Synthetic multi-contrast 3-D brain MRI with acute infarcts, for 3-D segmentation.

A stand-in for the acute-stroke MRI of AMAE: every subject has up to seven co-registered
contrasts in the order of :data:`CONTRASTS`; the trace-weighted DWI (``TRACE``) and its ``ADC``
map are always acquired, each other contrast is missing with ``missing_probability``. What the
phantom models, per subject:

- anatomy: an ellipsoidal head (random size, aspect, position, in-plane tilt and a lumpy
  outline) with a skull / scalp rim, a thin CSF rim, grey matter around white matter (the
  boundary is a smooth random field threshold, so it folds) and two lateral ventricles (CSF);
- tissue intensities from a table per contrast (:data:`TISSUE_INTENSITY`), a small tissue
  texture, a smooth multiplicative bias field per contrast, a scanner scale per contrast and
  Rician noise (the magnitude of complex Gaussian noise);
- 0 lesions (``no_lesion_fraction`` of the subjects) or ``lesion_count`` infarcts: smooth
  irregular ellipsoids inside the parenchyma (grey or white matter, never in the ventricles)
  that are hyperintense on the trace image and hypo- to iso-intense on ADC (restricted
  diffusion, the radiologist's definition), variably hyperintense on T2 / FLAIR (one
  "visibility" draw per lesion, weaker than on trace) and nearly invisible on T1, GRE and SWI
  (:data:`LESION_FACTOR`). ``mask`` marks the lesion voxels (classes: 0 background, 1 infarct).

The raw volumes (:func:`raw_subject`, what a scanner export holds after background masking) go
through the preprocessing of ``python -m mammojax.ingest --task=volume``: crop to the non-zero
bounding box, :func:`~mammojax.data.ingest.volume_csv.preprocess_contrasts` (trilinear; nearest for the
mask), z-score per contrast over its non-zero voxels, zeros for a missing contrast. So the
records and the manifest are those the ingest writes for the raw volumes saved as NIfTI (the
tests check this voxel for voxel): volume float16 [D, H, W, C], contrast_present int32 [C],
mask uint8 [D, H, W], has_mask int32 (always 1: the truth is known), subject_hash str.

Everything is a deterministic function of ``(seed, split, index)``; the default set (36
subjects of 32^3 voxels) generates in about a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from mammojax.data import records
from mammojax.data.constants import SPLITS, default_data_root
from mammojax.data.ingest import volume_csv
from mammojax.data.specs import spec_from_config
from mammojax.data.synthetic.splits import SplitCounts

KIND = "synthetic_volumes"
# AMAE's contrast vocabulary, in its order.
CONTRASTS = ("ADC", "TRACE", "T2", "GRE", "SWI", "T1", "FLAIR")
ALWAYS_PRESENT = ("ADC", "TRACE")
CLASSES = ("background", "infarct")

# Tissue labels of the phantom (index into TISSUE_INTENSITY's tuples).
_AIR, _SCALP, _CSF, _GREY, _WHITE = 0, 1, 2, 3, 4
# Relative intensity of (air, skull/scalp, CSF, grey matter, white matter) per contrast, chosen
# to follow the usual appearance: CSF has free diffusion (highest ADC, dark on b=1000 trace),
# is bright on T2 / T2* / SWI, dark on T1 and suppressed on FLAIR; grey matter is brighter than
# white matter on T2, FLAIR and trace and darker on T1; the rim mixes bright fat (T1, T2) with
# dark bone.
TISSUE_INTENSITY = {
  "ADC": (0.0, 0.30, 1.00, 0.30, 0.25),
  "TRACE": (0.0, 0.30, 0.15, 0.55, 0.45),
  "T2": (0.0, 0.60, 1.00, 0.55, 0.42),
  "GRE": (0.0, 0.40, 0.80, 0.55, 0.45),
  "SWI": (0.0, 0.35, 0.70, 0.50, 0.45),
  "T1": (0.0, 0.90, 0.15, 0.45, 0.65),
  "FLAIR": (0.0, 0.50, 0.10, 0.55, 0.45),
}
# Stored scale of a contrast (ADC maps hold 1e-6 mm^2/s, so CSF ~3000; the others arbitrary
# scanner units); the z-scoring removes it, as it does for real exports.
_SCANNER_SCALE = {"ADC": 3000.0}
# (low, high) of the factor a lesion multiplies its tissue's intensity by, per contrast. T2 and
# FLAIR take one "visibility" draw per lesion between their bounds (older infarcts show more).
LESION_FACTOR = {
  "ADC": (0.40, 0.75),
  "TRACE": (1.8, 2.6),
  "T2": (1.0, 1.6),
  "GRE": (0.97, 1.03),
  "SWI": (0.97, 1.03),
  "T1": (0.93, 1.0),
  "FLAIR": (1.0, 1.7),
}
_VISIBILITY = ("T2", "FLAIR")

# Independent random streams: np.random.default_rng([seed, split, index, stream]).
_PRESENCE, _ANATOMY, _LESIONS, _ACQUISITION = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SyntheticVolumeSpec(SplitCounts):
  """What to generate.

  Attributes:
    num_train, num_val, num_test: subjects per split.
    size: (D, H, W) voxels of the records (the ingest's ``--size``).
    contrasts: the contrast vocabulary, in record channel order; names from :data:`CONTRASTS`
      and holding both of :data:`ALWAYS_PRESENT`.
    missing_probability: probability that each optional contrast (not ADC / TRACE) is missing.
    lesion_count: (low, high) inclusive number of infarcts of a subject with lesions.
    lesion_radius: (low, high) uniform semi-axes of a lesion, fraction of the smallest side.
    no_lesion_fraction: share of subjects without any lesion (empty mask).
    noise_std: (low, high) uniform Rician noise level per contrast, relative to the intensities.
    bias_strength: std of the log bias field per contrast.
    seed: master seed.
    examples_per_shard: records per ArrayRecord shard.
  """

  num_train: int = 24
  num_val: int = 6
  num_test: int = 6
  size: tuple[int, int, int] = (32, 32, 32)
  contrasts: tuple[str, ...] = CONTRASTS
  missing_probability: float = 0.3
  lesion_count: tuple[int, int] = (1, 3)
  lesion_radius: tuple[float, float] = (0.06, 0.15)
  no_lesion_fraction: float = 0.15
  noise_std: tuple[float, float] = (0.02, 0.05)
  bias_strength: float = 0.15
  seed: int = 0
  examples_per_shard: int = 64

  def __post_init__(self):
    for name in ("size", "contrasts", "lesion_count", "lesion_radius", "noise_std"):
      object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from a config
    unknown = [c for c in self.contrasts if c not in TISSUE_INTENSITY]
    if unknown or len(set(self.contrasts)) != len(self.contrasts):
      raise ValueError(
        f"contrasts {self.contrasts!r}: names must be distinct and among {CONTRASTS} "
        f"(unknown: {unknown})"
      )
    absent = [c for c in ALWAYS_PRESENT if c not in self.contrasts]
    if absent:
      raise ValueError(f"contrasts {self.contrasts!r} lack {absent}: they are always acquired")
    if len(self.size) != 3 or min(self.size) < 8:
      raise ValueError(f"size {self.size!r} must be (D, H, W) with every side >= 8")
    low, high = self.lesion_count
    if not 1 <= low <= high:
      raise ValueError(f"lesion_count {self.lesion_count!r} must be (low, high), 1 <= low <= high")
    if not 0.0 <= self.missing_probability <= 1.0 or not 0.0 <= self.no_lesion_fraction <= 1.0:
      raise ValueError("missing_probability and no_lesion_fraction must lie in [0, 1]")


def subject_hash(spec: SyntheticVolumeSpec, split: str, index: int) -> str:
  """The pseudonym of subject ``index`` of ``split`` (a SHA-256 hex digest, like the ingest's)."""
  return hashlib.sha256(f"synthetic-volume-{spec.seed}-{split}-{index}".encode()).hexdigest()


def contrast_present(spec: SyntheticVolumeSpec, split: str, index: int) -> np.ndarray:
  """int32 [C]: which contrasts subject ``index`` has (its own random stream)."""
  rng = _rng(spec, split, index, _PRESENCE)
  draws = rng.random(len(spec.contrasts))
  return np.asarray(
    [c in ALWAYS_PRESENT or d >= spec.missing_probability for c, d in zip(spec.contrasts, draws)],
    np.int32,
  )


def raw_subject(
  spec: SyntheticVolumeSpec, split: str, index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Subject ``index`` before preprocessing, on a ``spec.size`` grid of 1 mm voxels.

  Returns:
    volume float32 [D, H, W, C] in scanner units, zero outside the head (as after background
    masking) and for a missing contrast; contrast_present int32 [C]; mask uint8 [D, H, W].
  """
  present = contrast_present(spec, split, index)
  tissue, texture = _anatomy(_rng(spec, split, index, _ANATOMY), spec.size)
  weights, factors = _lesions(_rng(spec, split, index, _LESIONS), spec, tissue)
  mask = (np.sum(weights, axis=0) > 0.5) if len(weights) else np.zeros(spec.size, bool)
  rng = _rng(spec, split, index, _ACQUISITION)
  head = tissue != _AIR
  volume = np.zeros(spec.size + (len(spec.contrasts),), np.float32)
  for c, name in enumerate(spec.contrasts):
    # Every contrast draws its acquisition, acquired or not, so presence changes nothing else.
    gain = rng.uniform(0.8, 1.25) * _SCANNER_SCALE.get(name, 1000.0)
    bias = np.exp(spec.bias_strength * _smooth_field(rng, spec.size, 3))
    sigma = rng.uniform(*spec.noise_std)
    noise = rng.standard_normal((2,) + spec.size)
    if not present[c]:
      continue
    signal = np.asarray(TISSUE_INTENSITY[name], np.float64)[tissue] * (1.0 + 0.04 * texture)
    for weight, factor in zip(weights, factors):
      signal = signal * (1.0 + weight * (factor[name] - 1.0))
    signal = signal * bias
    magnitude = np.sqrt((signal + sigma * noise[0]) ** 2 + (sigma * noise[1]) ** 2)
    volume[..., c] = np.where(head, gain * magnitude, 0.0)
  return volume, present, mask.astype(np.uint8)


def generate_example(spec: SyntheticVolumeSpec, split: str, index: int) -> dict[str, Any]:
  """The record of subject ``index``, as ``mammojax.ingest --task=volume`` writes it: volume
  float16 [D, H, W, C], contrast_present int32 [C], mask uint8 [D, H, W], has_mask int32,
  subject_hash str."""
  volume, present, mask = raw_subject(spec, split, index)
  out, labels = _preprocess(volume, present, mask, spec.size)
  return {
    "volume": out,
    "contrast_present": present,
    "subject_hash": subject_hash(spec, split, index),
    "mask": labels,
    "has_mask": np.int32(1),
  }


def write_dataset(root: str, spec: SyntheticVolumeSpec) -> str:
  """Writes every split once under ``root/synthetic_volumes_<fingerprint>``; returns it.

  A finished dataset (one with a manifest) is reused. The shards and manifest are written in a
  temporary folder beside it that is renamed into place when complete, so a crash or a
  concurrent writer never leaves a partial dataset under the final name.
  """
  out = os.path.join(root, f"{KIND}_{spec.fingerprint()}")
  if os.path.exists(os.path.join(out, records.MANIFEST)):
    return out
  os.makedirs(root, exist_ok=True)
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    splits = {}
    for split in SPLITS:
      count = spec.count(split)
      num_shards = max(1, -(-count // spec.examples_per_shard))
      entry = {"shards": [], "count": 0, "sha256": {}}
      for shard, indices in enumerate(records.split_evenly(range(count), num_shards)):
        name = records.shard_name(split, shard, num_shards)
        examples = (generate_example(spec, split, int(i)) for i in indices)
        written, digest = records.write_shard(os.path.join(tmp, name), examples)
        entry["shards"].append(name)
        entry["count"] += written
        entry["sha256"][name] = digest
      splits[split] = entry
    records.write_manifest(tmp, splits, manifest_config(spec))
    if os.path.isdir(out) and not os.path.exists(os.path.join(out, records.MANIFEST)):
      shutil.rmtree(out)  # an unfinished folder of an older, non-atomic writer
    try:
      os.rename(tmp, out)
    except OSError:
      if not os.path.exists(os.path.join(out, records.MANIFEST)):
        raise
      # Another process finished the same dataset first: keep its copy.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def manifest_config(spec: SyntheticVolumeSpec) -> dict[str, Any]:
  """The manifest's ``config``: every key the volume ingest writes (``task``, ``contrasts``,
  ``size``, ``has_mask``, ``volume_dtype``, ...) plus the spec, ``kind`` and ``classes``."""
  total = max(1, sum(spec.count(s) for s in SPLITS))
  return dict(
    dataclasses.asdict(spec),
    kind=KIND,
    task="volume",
    contrasts=list(spec.contrasts),
    size=list(spec.size),
    has_mask=True,
    volume_dtype="float16",
    split_seed=spec.seed,
    fractions={s: spec.count(s) / total for s in SPLITS},
    duplicates_dropped=0,
    records_per_shard=spec.examples_per_shard,
    failed=0,
    classes=list(CLASSES),
  )


def synthetic_spec(data: Mapping[str, Any]) -> SyntheticVolumeSpec:
  """The generator settings of a config's ``data`` section: the spec's fields found in
  ``data.synthetic`` (``root`` is where, not what), defaults for the others. Only that section:
  ``data.contrasts`` of a task names the channels it reads, not the vocabulary generated."""
  return spec_from_config(SyntheticVolumeSpec, data.get("synthetic") or {})


def dataset_dir(data: Mapping[str, Any]) -> str:
  """``data.dir`` (an ingested volume dataset), or the synthetic set, written on first use
  under ``data.synthetic.root`` or $MAMMOJAX_DATA (``default_data_root``)."""
  if data.get("dir"):
    return data["dir"]
  synthetic = data.get("synthetic") or {}
  return write_dataset(synthetic.get("root") or default_data_root(), synthetic_spec(data))


def _rng(spec: SyntheticVolumeSpec, split: str, index: int, stream: int) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return np.random.default_rng([spec.seed, SPLITS.index(split), index, stream])


def _preprocess(
  volume: np.ndarray, present: np.ndarray, mask: np.ndarray, size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """The ingest's preprocessing (:func:`~mammojax.data.ingest.volume_csv.preprocess_contrasts`)
  of raw [D, H, W, C] volumes on a 1 mm grid. Returns (float16 [D, H, W, C], uint8 [D, H, W])."""
  voxels = [volume[..., i] if present[i] else None for i in range(volume.shape[-1])]
  out, fit = volume_csv.preprocess_contrasts(voxels, (1.0, 1.0, 1.0), size)
  return out, volume_csv.fit_labels(mask, fit).astype(np.uint8)


def _smooth_field(rng: np.random.Generator, size: tuple[int, int, int], cells: int) -> np.ndarray:
  """float64 [D, H, W] smooth random field of std ~1 varying over ``size / cells`` voxels: a
  ``cells^3`` Gaussian grid spread by separable Gaussian bumps (one small matrix product per
  axis; far cheaper than a wide Gaussian filter or a cubic zoom of the full grid)."""
  coarse = rng.standard_normal((cells + 2,) * 3)
  bases = []
  for s in size:
    knots = (np.arange(cells + 2) - 0.5) * s / cells  # one knot beyond each face
    width = s / cells
    bases.append(np.exp(-0.5 * ((np.arange(s)[:, None] + 0.5 - knots[None]) / width) ** 2))
  fine = np.einsum("ia,jb,kc,abc->ijk", *bases, coarse, optimize=True)
  return (fine - fine.mean()) / (fine.std() + 1e-8)


def _anatomy(rng: np.random.Generator, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(int [D, H, W] tissue labels, float [D, H, W] texture of std 1). Axes: D superior-inferior,
  H anterior-posterior, W left-right (the ingest's axial-first order)."""
  grid = np.meshgrid(*[(np.arange(s) - (s - 1) / 2) / (s / 2) for s in size], indexing="ij")
  center = rng.uniform(-0.04, 0.04, 3)
  radii = rng.uniform(0.84, 0.96, 3)
  tilt = np.deg2rad(rng.uniform(-8.0, 8.0))  # head rotation in the axial (H, W) plane
  z = grid[0] - center[0]
  y = np.cos(tilt) * (grid[1] - center[1]) + np.sin(tilt) * (grid[2] - center[2])
  x = -np.sin(tilt) * (grid[1] - center[1]) + np.cos(tilt) * (grid[2] - center[2])
  rho = np.sqrt((z / radii[0]) ** 2 + (y / radii[1]) ** 2 + (x / radii[2]) ** 2)
  rho = rho * (1.0 + 0.02 * _smooth_field(rng, size, 3))  # a lumpy head outline
  gyri = _smooth_field(rng, size, 6)
  white = _smooth_field(rng, size, 5)
  tissue = np.full(size, _AIR, np.int64)
  tissue[rho <= 1.0] = _SCALP
  tissue[rho <= 0.90] = _CSF
  brain = rho <= 0.86 + 0.025 * gyri
  tissue[brain] = _GREY
  tissue[brain & (rho <= 0.62 + 0.08 * white)] = _WHITE
  # Lateral ventricles: elongated front to back, one each side of the midline, near the centre.
  scale = rng.uniform(0.8, 1.3)
  for side in (-1.0, 1.0):
    offset = np.array([0.05, 0.0, side * rng.uniform(0.10, 0.14)]) + rng.normal(0, 0.015, 3)
    semi = np.array([0.14, 0.30, 0.07]) * scale * rng.uniform(0.9, 1.1, 3)
    inside = sum(((a - o) / s) ** 2 for a, o, s in zip((z, y, x), offset, semi)) <= 1.0
    tissue[inside & brain] = _CSF
  texture = ndimage.gaussian_filter(rng.standard_normal(size), 1.0)
  return tissue, texture / (texture.std() + 1e-8)


def _lesions(
  rng: np.random.Generator, spec: SyntheticVolumeSpec, tissue: np.ndarray
) -> tuple[list[np.ndarray], list[dict[str, float]]]:
  """Per lesion: a soft occupancy [D, H, W] in [0, 1] (zero outside the parenchyma) and its
  intensity factor per contrast. No lesion with probability ``no_lesion_fraction``."""
  if rng.random() < spec.no_lesion_fraction:
    return [], []
  low, high = spec.lesion_count
  count = int(rng.integers(low, high + 1))
  # One voxel in from CSF and the rim: a lesion voxel must not share partial volume with CSF,
  # whose free diffusion would hide the ADC drop (real infarcts can touch the ventricles, but
  # the ingest's resampling would then mix CSF into the labelled voxels).
  parenchyma = ndimage.binary_erosion((tissue == _GREY) | (tissue == _WHITE))
  candidates = np.flatnonzero(parenchyma)
  shape = _smooth_field(rng, spec.size, 6)
  grid = np.indices(spec.size, dtype=np.float64)
  weights, factors = [], []
  for _ in range(count):
    centre = np.unravel_index(candidates[rng.integers(len(candidates))], spec.size)
    semi = rng.uniform(*spec.lesion_radius, 3) * min(spec.size)
    distance = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi)))
    # An irregular outline (+-35 % of the radius); the centre (distance 0) always belongs to it.
    distance = distance * (1.0 + 0.35 * np.tanh(shape))
    weights.append(
      np.where(parenchyma, 1.0 / (1.0 + np.exp(np.clip((distance - 1) * 8, -50, 50))), 0)
    )
    visibility = rng.random()
    factor = {}
    for name, (a, b) in LESION_FACTOR.items():
      draw = visibility if name in _VISIBILITY else rng.random()
      factor[name] = a + (b - a) * draw
    factors.append(factor)
  return weights, factors
