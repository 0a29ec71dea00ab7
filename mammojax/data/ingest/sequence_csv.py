"""Sequence CSV for the temporal task: each image with the patient's earlier images.

Scaffolding for a coming system: the sequence records feed the Temporal-GradCam model, which is
not implemented yet; ``python -m mammojax.ingest --task=sequence`` already writes them.

Columns: ``patient_id``, ``date`` (YYYY-MM-DD), ``image_path`` (relative to the images root),
``label`` (integer class); optional ``split``. One record per row, as in the Temporal-GradCam
setup: the row's image is the last element of a sequence holding the patient's earlier images
(oldest first), at most ``max_length`` of them counting the current one (older images are
dropped). Padding to a fixed length is the pipeline's job.

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

REQUIRED_COLUMNS = ("patient_id", "date", "image_path", "label")


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
  """Attributes: max_length (0 = unlimited), split fractions / seed, preprocessing (generic
  images: no breast crop or orientation by default)."""

  max_length: int = 0
  fractions: tuple[tuple[str, float], ...] = (("train", 0.8), ("test", 0.2))
  seed: int = 0
  preprocess: MammoPreprocessConfig = MammoPreprocessConfig(
    height=256, width=256, orientation="none", crop=False
  )


@dataclasses.dataclass(frozen=True)
class SequenceItem:
  rows: str
  order: int
  paths: tuple[str, ...]
  fields: dict[str, Any]
  preprocess: MammoPreprocessConfig

  @property
  def files(self) -> tuple[str, ...]:
    return self.paths

  def build(self) -> dict[str, Any]:
    images = np.stack([load_mammogram(p, None, self.preprocess)[0] for p in self.paths])
    return {"images": images, **self.fields}


def plan(
  csv_path: str, images_root: str, options: SequenceOptions, salt: str
) -> tabular.IngestPlan:
  """Orders each patient's images by date and emits one sequence per image."""
  if options.max_length < 0:
    raise ValueError(f"max_length must be >= 0, got {options.max_length}")
  table = tabular.read_table(csv_path, REQUIRED_COLUMNS)
  errors: list[tabular.ErrorRow] = []
  by_patient = defaultdict(list)
  for row, line in zip(table.rows, table.lines):
    date = tabular.parse_date(row["date"], "date", line)
    label = tabular.parse_float(row["label"], "label", line)
    if label != int(label):
      raise ValueError(f"line {line}: label {row['label']!r} is not an integer class")
    path = os.path.join(images_root, row["image_path"])
    if not os.path.isfile(path):
      errors.append(tabular.ErrorRow(f"line {line}", path, "file does not exist"))
      continue
    by_patient[row["patient_id"]].append((date, line, path, int(label), row.get("split", "")))

  items_by_patient, declared, outcomes = {}, {}, {}
  for patient, rows in by_patient.items():
    key = tabular.pseudonym(patient, salt)
    rows.sort()
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
  }
  return tabular.IngestPlan(splits=splits, errors=errors, config=config, stat_fields=("images",))
