"""Sequence CSV for the temporal task: each image with the patient's earlier images.

The records feed the Temporal-GradCam tasks (:mod:`mammojax.tasks.temporal`) through
:mod:`mammojax.data.pipelines.sequence`.

Columns: ``patient_id``, ``date`` (YYYY-MM-DD), ``image_path`` (relative to the images root),
``label`` (integer class); optional ``split``. One record per row, as in the Temporal-GradCam
setup: the row's image is the last element of a sequence holding the patient's earlier images
(oldest first), at most ``max_length`` of them counting the current one (older images are
dropped). Padding to a fixed length is the pipeline's job.

Refused with the CSV line: a date that does not parse, two images of one patient on one date
(their order would be arbitrary), a non-integer label, an image path that leaves the images root
(absolute, ``..``, a symlink to outside), a row repeating the patient and image of an earlier one
(both lines named; with ``duplicates='drop'`` identical repeats are dropped and counted in
``duplicates_dropped``), and with ``label_scope='patient'`` (the
reference's setting: the class is the patient's) a label that changes within a patient. With
``expected_size`` set, an image of another size is an error row naming the file (the rest is
ingested); without it every image is resized.

Record fields: images uint16 [T, H, W]; time_offsets float32 [T] (years before the last image,
so the last is 0); image_labels int32 [T]; label int32 (the last image's label); length int32;
patient_hash str.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from typing import Any

import numpy as np

from mammojax.data.ingest import tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig, load_mammogram
from mammojax.data.ingest.readers import ImageReadError

REQUIRED_COLUMNS = ("patient_id", "date", "image_path", "label")
LABEL_SCOPES = ("image", "patient")


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
  """Attributes: max_length (0 = unlimited), split fractions / seed, preprocessing (generic
  images: no breast crop or orientation by default), label_scope (``'image'``: each row's own
  label; ``'patient'``: one label per patient, checked), expected_size (``(H, W)`` every source
  image must have; None = any size, resized), duplicates ('error' refuses a repeated patient and
  image, 'drop' keeps the first of identical rows)."""

  max_length: int = 0
  label_scope: str = "image"
  expected_size: tuple[int, int] | None = None
  fractions: tuple[tuple[str, float], ...] = (("train", 0.8), ("test", 0.2))
  seed: int = 0
  preprocess: MammoPreprocessConfig = MammoPreprocessConfig(
    height=256, width=256, orientation="none", crop=False
  )
  duplicates: str = "error"


@dataclasses.dataclass(frozen=True)
class SequenceItem:
  rows: str
  order: int
  paths: tuple[str, ...]
  fields: dict[str, Any]
  preprocess: MammoPreprocessConfig
  expected_size: tuple[int, int] | None = None

  @property
  def files(self) -> tuple[str, ...]:
    return self.paths

  def build(self) -> dict[str, Any]:
    images = []
    for path in self.paths:
      image, geometry = load_mammogram(path, None, self.preprocess)
      y0, x0, y1, x1 = geometry.crop
      if self.expected_size and (y1 - y0, x1 - x0) != tuple(self.expected_size):
        h, w = self.expected_size
        raise ImageReadError(
          path,
          f"image is {y1 - y0}x{x1 - x0}, the others are {h}x{w}; pass --size=HxW to resize "
          "every image",
        )
      images.append(image)
    return {"images": np.stack(images), **self.fields}


def plan(
  csv_path: str, images_root: str, options: SequenceOptions, salt: str
) -> tabular.IngestPlan:
  """Orders each patient's images by date and emits one sequence per image."""
  if options.max_length < 0:
    raise ValueError(f"max_length must be >= 0, got {options.max_length}")
  if options.label_scope not in LABEL_SCOPES:
    raise ValueError(f"label_scope must be one of {LABEL_SCOPES}, got {options.label_scope!r}")
  images_root = tabular.images_root(images_root)
  table = tabular.read_table(csv_path, REQUIRED_COLUMNS)
  errors: list[tabular.ErrorRow] = []
  by_patient = defaultdict(list)
  paths = {
    line: tabular.confined_path(images_root, row["image_path"], line, "image_path")
    for row, line in zip(table.rows, table.lines)
  }
  dropped = tabular.duplicate_lines(
    (
      (line, (row["patient_id"], paths[line]), {c: v for c, v in row.items() if c != "image_path"})
      for row, line in zip(table.rows, table.lines)
    ),
    options.duplicates,
    "patient and image",
  )
  for row, line in zip(table.rows, table.lines):
    if line in dropped:
      continue
    date = tabular.parse_date(row["date"], "date", line)
    label = tabular.parse_float(row["label"], "label", line)
    if label != int(label):
      raise ValueError(f"line {line}: label {row['label']!r} is not an integer class")
    path = paths[line]
    if not os.path.isfile(path):
      errors.append(tabular.ErrorRow(f"line {line}", path, "file does not exist"))
      continue
    by_patient[row["patient_id"]].append((date, line, path, int(label), row.get("split", "")))

  items_by_patient, declared, outcomes = {}, {}, {}
  for patient, rows in by_patient.items():
    key = tabular.pseudonym(patient, salt)
    rows.sort()
    _check_patient_rows(rows, options.label_scope)
    items = []
    for i, (date, line, _path, label, _) in enumerate(rows):
      start = 0 if options.max_length == 0 else max(0, i + 1 - options.max_length)
      window = rows[start : i + 1]
      fields = {
        "time_offsets": np.asarray([tabular.years_between(r[0], date) for r in window], np.float32),
        "image_labels": np.asarray([r[3] for r in window], np.int32),
        "label": np.int32(label),
        "length": np.int32(len(window)),
        "patient_hash": key,
      }
      items.append(
        SequenceItem(
          rows=f"line {line}",
          order=line,
          paths=tuple(r[2] for r in window),
          fields=fields,
          preprocess=options.preprocess,
          expected_size=options.expected_size,
        )
      )
    items_by_patient[key] = items
    outcomes[key] = max(r[3] for r in rows)
    if "split" in table.columns:
      declared[key] = [(r[1], r[4]) for r in rows]
  assignment = tabular.assign_patients(declared, outcomes, options.fractions, options.seed)
  splits = tabular.items_by_split(items_by_patient, assignment, options.fractions)
  config = {
    "task": "sequence",
    "max_length": options.max_length,
    "preprocess": options.preprocess.to_dict(),
    "split_seed": options.seed,
    "fractions": dict(options.fractions),
    "duplicates_dropped": len(dropped),
  }
  return tabular.IngestPlan(
    splits=splits,
    errors=errors,
    config=config,
    stat_fields=("images",),
    redactor=tabular.Redactor(images_root, salt, frozenset(r["patient_id"] for r in table.rows)),
  )


def _check_patient_rows(rows: list[tuple], label_scope: str) -> None:
  """One patient's rows ``(date, line, path, label, split)``, sorted by date: no two on one date,
  and one label when ``label_scope == 'patient'``."""
  for earlier, later in zip(rows, rows[1:]):
    if earlier[0] == later[0]:
      raise ValueError(
        f"lines {earlier[1]} and {later[1]}: one patient has two images dated {later[0]}; "
        "their order is ambiguous (fix the date column or drop one row)"
      )
  labels = {r[3] for r in rows}
  if label_scope == "patient" and len(labels) > 1:
    first = min(rows, key=lambda r: r[1])
    other = next(r for r in rows if r[3] != first[3])
    raise ValueError(
      f"line {other[1]}: label {other[3]} differs from the same patient's label {first[3]} on "
      f"line {first[1]}; with --label_scope=patient a patient has one class (use "
      "--label_scope=image if labels may change over time)"
    )
