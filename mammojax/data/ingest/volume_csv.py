"""Volume CSV for multi-contrast 3-D MRI: one subject per row, a variable set of contrasts.

Scaffolding for a coming system: the volume records are for the 3-D MRI model, which is not
implemented yet; ``python -m mammojax.ingest --task=volume`` already writes them.

Columns: ``subject``; one column per contrast holding a NIfTI path relative to the images root
(an empty cell = contrast not acquired); optional ``mask`` (segmentation NIfTI) and ``split``.
The contrast columns are the ones named in ``VolumeOptions.contrasts`` or, by default, every
column except subject / mask / split. The contrasts of a subject (and its mask) must share one
voxel grid (co-registered): the same shape, spacing and affine, which is checked; a subject whose
files differ is an error row. A path that leaves the images root (absolute, ``..``, a symlink to
outside) is refused with its line and column; a subject on two rows is refused naming both lines
(with ``duplicates='drop'``, identical repeated rows are dropped instead).

Preprocessing: crop to the bounding box of the non-zero voxels of all contrasts, resample
(trilinear; nearest for the mask) to fit ``size`` preserving the physical aspect ratio from the
voxel spacing, pad centrally with zeros, and z-score each contrast over its non-zero voxels.

Record fields: volume float16 [D, H, W, C] (zeros for a missing contrast); contrast_present int32
[C]; mask uint8 [D, H, W] and has_mask int32 (when a mask column exists); subject_hash str.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from mammojax.data.ingest import tabular
from mammojax.data.ingest.readers import ImageReadError, read_nifti

RESERVED = ("subject", "mask", "split")
# Largest difference between two spacings or affine entries (mm; the rotation entries are scaled
# by the spacing) that still counts as the same grid: header rounding, not a real shift.
GRID_TOLERANCE_MM = 1e-2


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
  """Attributes: output size (D, H, W); contrast columns (empty = all others); splits;
  duplicates ('error' refuses a subject on two rows, 'drop' keeps the first of identical rows)."""

  size: tuple[int, int, int] = (96, 96, 96)
  contrasts: tuple[str, ...] = ()
  fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
  seed: int = 0
  duplicates: str = "error"


@dataclasses.dataclass(frozen=True)
class VolumeItem:
  rows: str
  order: int
  paths: tuple[str | None, ...]  # one per contrast, None when missing
  mask_path: str | None
  with_mask: bool
  size: tuple[int, int, int]
  subject_hash: str
  names: tuple[str, ...] = ()  # the contrast columns, for messages

  @property
  def files(self) -> tuple[str, ...]:
    return tuple(p for p in self.paths if p) + ((self.mask_path,) if self.mask_path else ())

  def build(self) -> dict[str, Any]:
    volumes = {i: read_nifti(p) for i, p in enumerate(self.paths) if p}
    first_index = next(iter(volumes))
    first = volumes[first_index]
    first_name = self._name(first_index)
    for i, vol in volumes.items():
      if vol.voxels.shape != first.voxels.shape:
        raise ImageReadError(
          self.paths[i],
          f"shape {vol.voxels.shape} differs from the "
          f"subject's other contrasts {first.voxels.shape}; co-register them",
        )
      _check_same_grid(self.paths[i], f"contrast {self._name(i)}", vol, first_name, first)
    mask = read_nifti(self.mask_path) if self.mask_path else None
    if mask is not None and mask.voxels.shape != first.voxels.shape:
      raise ImageReadError(
        self.mask_path,
        f"mask shape {mask.voxels.shape} differs from the image shape {first.voxels.shape}",
      )
    if mask is not None:
      _check_same_grid(self.mask_path, "the mask", mask, first_name, first)
    voxels = [volumes[i].voxels if i in volumes else None for i in range(len(self.paths))]
    try:
      out, fit = preprocess_contrasts(voxels, first.spacing, self.size)
    except ValueError as e:
      raise ImageReadError(self.paths[first_index], str(e)) from None
    record = {
      "volume": out,
      "contrast_present": np.asarray([p is not None for p in self.paths], np.int32),
      "subject_hash": self.subject_hash,
    }
    if self.with_mask:
      labels = np.zeros(self.size, np.uint8) if mask is None else fit_labels(mask.voxels, fit)
      record["mask"] = labels.astype(np.uint8)
      record["has_mask"] = np.int32(mask is not None)
    return record

  def _name(self, index: int) -> str:
    return repr(self.names[index]) if index < len(self.names) else f"#{index}"


def _check_same_grid(path: str, what: str, volume, first_name: str, first) -> None:
  """Refuses a volume of the subject's shape on another voxel grid (spacing or affine)."""
  spacing, reference = np.asarray(volume.spacing), np.asarray(first.spacing)
  if not np.allclose(spacing, reference, rtol=0, atol=GRID_TOLERANCE_MM):
    raise ImageReadError(
      path,
      f"{what} has voxel spacing {tuple(round(float(v), 4) for v in spacing)} mm, contrast "
      f"{first_name} {tuple(round(float(v), 4) for v in reference)} mm: same shape, different "
      "voxel grids; resample them onto one grid (co-register)",
    )
  shift = float(np.max(np.abs(np.asarray(volume.affine) - np.asarray(first.affine))))
  if shift > GRID_TOLERANCE_MM:
    raise ImageReadError(
      path,
      f"{what} has another affine (voxel-to-world matrix) than contrast {first_name} (largest "
      f"difference {shift:.3g} mm): same shape, different voxel grids (origin or orientation); "
      "resample them onto one grid (co-register)",
    )


def plan(csv_path: str, images_root: str, options: VolumeOptions, salt: str) -> tabular.IngestPlan:
  """One item per subject row; missing files go to the errors list.

  Raises:
    ValueError: a missing images folder or column, a path outside the images folder, a subject
      on two rows (unless identical rows are dropped), a patient in two splits.
  """
  images_root = tabular.images_root(images_root)
  table = tabular.read_table(csv_path, ("subject",) + options.contrasts)
  contrasts = options.contrasts or tuple(c for c in table.columns if c not in RESERVED)
  if not contrasts:
    raise ValueError(f"{csv_path}: no contrast columns (every column is one of {RESERVED})")
  with_mask = "mask" in table.columns
  errors: list[tabular.ErrorRow] = []
  items, declared = {}, defaultdict(list)
  dropped = tabular.duplicate_lines(
    (
      (line, row["subject"], {c: v for c, v in row.items() if c != "subject"})
      for row, line in zip(table.rows, table.lines)
    ),
    options.duplicates,
    "subject",
  )
  for row, line in zip(table.rows, table.lines):
    if line in dropped:
      continue
    paths = tuple(
      None if tabular.is_missing(row[c]) else tabular.confined_path(images_root, row[c], line, c)
      for c in contrasts
    )
    mask_path = (
      tabular.confined_path(images_root, row["mask"], line, "mask")
      if with_mask and not tabular.is_missing(row["mask"])
      else None
    )
    if not any(paths):
      errors.append(tabular.ErrorRow(f"line {line}", "", "the subject has no contrast"))
      continue
    absent = [p for p in paths + (mask_path,) if p and not os.path.isfile(p)]
    if absent:
      errors.append(tabular.ErrorRow(f"line {line}", absent[0], "file does not exist"))
      continue
    key = tabular.pseudonym(row["subject"], salt)
    items[key] = VolumeItem(
      rows=f"line {line}",
      order=line,
      paths=paths,
      mask_path=mask_path,
      with_mask=with_mask,
      size=tuple(options.size),
      subject_hash=key,
      names=tuple(contrasts),
    )
    if "split" in table.columns:
      declared[key].append((line, row["split"]))
  assignment = tabular.assign_patients(
    declared, {k: 0 for k in items}, options.fractions, options.seed
  )
  splits = tabular.items_by_split({k: [i] for k, i in items.items()}, assignment, options.fractions)
  config = {
    "task": "volume",
    "contrasts": list(contrasts),
    "size": list(options.size),
    "has_mask": with_mask,
    "volume_dtype": "float16",
    "split_seed": options.seed,
    "fractions": dict(options.fractions),
    "duplicates_dropped": len(dropped),
  }
  return tabular.IngestPlan(
    splits=splits,
    errors=errors,
    config=config,
    redactor=tabular.Redactor(images_root, salt, frozenset(r["subject"] for r in table.rows)),
  )


@dataclasses.dataclass(frozen=True)
class VolumeFit:
  """Where the preprocessing put a subject's voxels, to map outputs back to its own grid.

  Attributes:
    shape: the input grid ``(D, H, W)``.
    spacing: its voxel spacing (mm).
    crop: ``(start, stop)`` per axis of the non-zero bounding box on the input grid.
    size: the record's grid.
    region: ``(start, stop)`` per axis of the resampled box inside the record's grid.
  """

  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  crop: tuple[tuple[int, int], ...]
  size: tuple[int, int, int]
  region: tuple[tuple[int, int], ...]

  def crop_slices(self) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in self.crop)

  def region_slices(self) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in self.region)


def preprocess_contrasts(
  voxels: Sequence[np.ndarray | None],
  spacing: tuple[float, float, float],
  size: tuple[int, int, int],
) -> tuple[np.ndarray, VolumeFit]:
  """The volume ingest's preprocessing of one subject's co-registered contrasts.

  Crops to the bounding box of the voxels that are non-zero in any present contrast, resamples
  (trilinear) to fit ``size`` keeping the physical aspect ratio (:func:`fit_to_size`), pads
  centrally with zeros and z-scores each contrast over its non-zero voxels.

  Args:
    voxels: one ``[D, H, W]`` array per contrast slot, None where the contrast is missing.
    spacing: the voxel spacing of every array (mm).
    size: the output grid.
  Returns:
    ``(volume float16 [*size, C] with zeros for a missing contrast, fit)``.
  """
  present = [v for v in voxels if v is not None]
  if not present:
    raise ValueError("no contrast is present")
  shape = present[0].shape
  nonzero = np.argwhere(np.any(np.stack(present) != 0, axis=0))
  if nonzero.size == 0:
    raise ValueError("every contrast is all zeros")
  lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
  crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
  out = np.zeros(tuple(size) + (len(voxels),), np.float16)
  for i, volume in enumerate(voxels):
    if volume is None:
      continue
    out[..., i] = zscore_nonzero(fit_to_size(volume[crop], spacing, size, order=1))
  fitted = _fitted_shape(tuple(int(b - a) for a, b in zip(lo, hi)), spacing, size)
  starts = [(s - r) // 2 for s, r in zip(size, fitted)]
  fit = VolumeFit(
    shape=tuple(int(d) for d in shape),
    spacing=tuple(float(x) for x in spacing),
    crop=tuple((int(a), int(b)) for a, b in zip(lo, hi)),
    size=tuple(int(s) for s in size),
    region=tuple((a, a + r) for a, r in zip(starts, fitted)),
  )
  return out, fit


def zscore_nonzero(voxels: np.ndarray) -> np.ndarray:
  """Z-scored over its non-zero voxels, zeros kept (all zeros stay zeros): float32."""
  fg = voxels != 0
  values = voxels[fg]
  if not values.size:
    return np.zeros(voxels.shape, np.float32)
  return np.where(fg, (voxels - values.mean()) / (values.std() + 1e-6), 0.0).astype(np.float32)


def fit_labels(labels: np.ndarray, fit: VolumeFit) -> np.ndarray:
  """A label map ``[D, H, W]`` on the input grid -> the record's grid (nearest), float32."""
  return fit_to_size(np.rint(labels[fit.crop_slices()]), fit.spacing, fit.size, order=0)


def restore_to_grid(array: np.ndarray, fit: VolumeFit, order: int) -> np.ndarray:
  """Inverse of the preprocessing's geometry: ``[*size, ...]`` on the record's grid -> the input
  grid ``[*shape, ...]`` (resampled back with spline ``order``: 0 for labels, 1 for logits; zero
  outside the cropped box)."""
  box = array[fit.region_slices()]
  target = tuple(b - a for a, b in fit.crop)
  zoom = [t / s for t, s in zip(target, box.shape[:3])] + [1.0] * (box.ndim - 3)
  resized = ndimage.zoom(box.astype(np.float32), zoom, order=order, mode="nearest", grid_mode=True)
  out = np.zeros(fit.shape + array.shape[3:], np.float32)
  out[fit.crop_slices()] = resized
  return out


def _fitted_shape(
  extent_voxels: tuple[int, ...], spacing: tuple[float, float, float], size: tuple[int, int, int]
) -> list[int]:
  """The resampled box shape :func:`fit_to_size` gives a ``extent_voxels`` crop."""
  extent = np.asarray(extent_voxels) * np.asarray(spacing)
  scale = min(s / e for s, e in zip(size, extent))
  return [min(s, max(1, int(round(e * scale)))) for s, e in zip(size, extent)]


def fit_to_size(
  volume: np.ndarray, spacing: tuple[float, float, float], size: tuple[int, int, int], order: int
) -> np.ndarray:
  """Resamples ``[d, h, w]`` to fit ``size`` keeping physical aspect, then pads centrally."""
  shape = _fitted_shape(volume.shape, spacing, size)
  zoom = [n / o for n, o in zip(shape, volume.shape)]
  resized = ndimage.zoom(
    volume.astype(np.float32), zoom, order=order, mode="nearest", grid_mode=True
  )
  out = np.zeros(size, np.float32)
  starts = [(s - r) // 2 for s, r in zip(size, resized.shape)]
  out[tuple(slice(a, a + r) for a, r in zip(starts, resized.shape))] = resized
  return out
