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
    stack = np.stack([v.voxels for v in volumes.values()])
    nonzero = np.argwhere(np.any(stack != 0, axis=0))
    if nonzero.size == 0:
      raise ImageReadError(self.paths[0] or self.files[0], "every contrast is all zeros")
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros(self.size + (len(self.paths),), np.float16)
    for i, vol in volumes.items():
      resized = fit_to_size(vol.voxels[crop], first.spacing, self.size, order=1)
      fg = resized != 0
      values = resized[fg]
      if values.size:
        resized = np.where(fg, (resized - values.mean()) / (values.std() + 1e-6), 0.0)
      out[..., i] = resized
    record = {
      "volume": out,
      "contrast_present": np.asarray([p is not None for p in self.paths], np.int32),
      "subject_hash": self.subject_hash,
    }
    if self.with_mask:
      labels = (
        np.zeros(self.size, np.uint8)
        if mask is None
        else fit_to_size(np.rint(mask.voxels[crop]), first.spacing, self.size, order=0)
      )
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


def fit_to_size(
  volume: np.ndarray, spacing: tuple[float, float, float], size: tuple[int, int, int], order: int
) -> np.ndarray:
  """Resamples ``[d, h, w]`` to fit ``size`` keeping physical aspect, then pads centrally."""
  extent = np.asarray(volume.shape) * np.asarray(spacing)
  scale = min(s / e for s, e in zip(size, extent))
  shape = [min(s, max(1, int(round(e * scale)))) for s, e in zip(size, extent)]
  zoom = [n / o for n, o in zip(shape, volume.shape)]
  resized = ndimage.zoom(
    volume.astype(np.float32), zoom, order=order, mode="nearest", grid_mode=True
  )
  out = np.zeros(size, np.float32)
  starts = [(s - r) // 2 for s, r in zip(size, resized.shape)]
  out[tuple(slice(a, a + r) for a, r in zip(starts, resized.shape))] = resized
  return out
