"""VinDr-style MIL CSV: one mammogram per record with image-level labels and lesion boxes.

Columns: ``laterality`` (L/R), ``view``, the image-level label columns (default ``Mass``,
``Suspicious_Calcification``; 0/1), and the image as ``image_path`` (relative to the images
root) or ``patient_id`` + ``image_id`` (``ROOT/<patient_id>/<image_id>.png|.dcm``, the layout of
the public VinDr PNG export). A label column may instead come from a ``finding_categories``
column listing findings (``"['Mass', 'Suspicious Calcification']"``). Optional: ``split``
(training/test), ``patient_id`` or ``study_id`` (pseudonymised; the split unit), and lesion boxes
``xmin, ymin, xmax, ymax`` in source pixels. Several rows may describe the same image (one per
lesion, as VinDr does): labels are OR-ed and boxes collected. Identical rows (the same image and
every other cell equal, which would repeat a box) are refused naming both lines, or with
``duplicates='drop'`` all but the first are dropped (counted in ``duplicates_dropped``). An image
path that leaves the images root (absolute, ``..``, a symlink to outside) is refused with its
line.

Record fields: image uint16 [H, W]; labels float32 [K]; boxes float32 [N, 4] (x0, y0, x1, y1 in
output pixels, after crop / mirror / resize; N may be 0); num_boxes int32; laterality int32
(0 L, 1 R); view int32 (``VIEW_CODES``); patient_hash str.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import defaultdict
from typing import Any

import numpy as np

from mammojax.data.constants import IMAGE_SUFFIXES
from mammojax.data.ingest import tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig, load_mammogram

VIEW_CODES = {"CC": 0, "MLO": 1}  # anything else: 2
BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


@dataclasses.dataclass(frozen=True)
class MilOptions:
  """Attributes: label column names, split fractions / seed, preprocessing, duplicates
  ('error' refuses identical rows, 'drop' keeps the first)."""

  labels: tuple[str, ...] = ("Mass", "Suspicious_Calcification")
  fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
  seed: int = 0
  preprocess: MammoPreprocessConfig = MammoPreprocessConfig()
  duplicates: str = "error"


@dataclasses.dataclass(frozen=True)
class MilItem:
  rows: str
  order: int
  path: str
  laterality: str
  fields: dict[str, Any]
  source_boxes: np.ndarray  # [N, 4] source pixels
  preprocess: MammoPreprocessConfig

  @property
  def files(self) -> tuple[str, ...]:
    return (self.path,)

  def build(self) -> dict[str, Any]:
    image, geometry = load_mammogram(self.path, self.laterality, self.preprocess)
    boxes = geometry.map_boxes(self.source_boxes)
    return {"image": image, "boxes": boxes, "num_boxes": np.int32(len(boxes)), **self.fields}


def plan(csv_path: str, images_root: str, options: MilOptions, salt: str) -> tabular.IngestPlan:
  """Groups rows by image, parses labels and boxes, assigns patient-level splits."""
  images_root = tabular.images_root(images_root)
  table = tabular.read_table(csv_path, ("laterality", "view"))
  if "image_path" not in table.columns and not {"patient_id", "image_id"} <= set(table.columns):
    raise ValueError(
      f"{csv_path}: missing column 'image_path' (or both 'patient_id' and "
      f"'image_id'); the CSV has {list(table.columns)}"
    )
  for label in options.labels:
    if label not in table.columns and "finding_categories" not in table.columns:
      raise ValueError(
        f"{csv_path}: missing label column {label!r} (and no "
        f"'finding_categories' column); the CSV has {list(table.columns)}"
      )
  has_boxes = set(BOX_COLUMNS) <= set(table.columns)
  errors: list[tabular.ErrorRow] = []
  paths = {}
  for row, line in zip(table.rows, table.lines):
    paths[line] = _image_path(row, line, images_root)
    if paths[line] is None:
      errors.append(
        tabular.ErrorRow(
          f"line {line}",
          os.path.join(images_root, row.get("patient_id", ""), row.get("image_id", "")),
          "no .png/.dcm file for this patient_id / image_id",
        )
      )
  dropped = tabular.duplicate_lines(
    (
      (line, (paths[line], tuple(sorted(row.items()))), {})
      for row, line in zip(table.rows, table.lines)
      if paths[line]
    ),
    options.duplicates,
    "image and every other cell",
  )
  images: dict[str, dict[str, Any]] = {}
  for row, line in zip(table.rows, table.lines):
    path = paths[line]
    if path is None or line in dropped:
      continue
    entry = images.setdefault(
      path, {"lines": [], "labels": np.zeros(len(options.labels)), "boxes": [], "row": row}
    )
    first = entry["row"]
    for column in ("patient_id", "study_id"):
      if first.get(column, "") != row.get(column, ""):
        raise ValueError(
          f"lines {entry['lines'][0]} and {line} name the same image under different "
          f"{column}s; an image belongs to one patient (fix the {column} column)"
        )
    entry["lines"].append(line)
    entry["labels"] = np.maximum(entry["labels"], _labels(row, line, options.labels))
    if has_boxes and not all(tabular.is_missing(row[c]) for c in BOX_COLUMNS):
      box = [tabular.parse_float(row[c], c, line) for c in BOX_COLUMNS]
      if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"line {line}: box {box} has xmax <= xmin or ymax <= ymin")
      entry["boxes"].append(box)

  items_by_patient = defaultdict(list)
  declared = defaultdict(list)
  outcomes: dict[str, int] = {}
  for path, entry in images.items():
    row, line = entry["row"], entry["lines"][0]
    if not os.path.isfile(path):
      errors.append(tabular.ErrorRow(f"line {line}", path, "file does not exist"))
      continue
    laterality = row["laterality"].upper()[:1]
    if laterality not in ("L", "R"):
      raise ValueError(f"line {line}: laterality is {row['laterality']!r}; use L or R")
    patient = tabular.pseudonym(row.get("patient_id") or row.get("study_id") or path, salt)
    fields = {
      "labels": entry["labels"].astype(np.float32),
      "laterality": np.int32(laterality == "R"),
      "view": np.int32(VIEW_CODES.get(row["view"].upper(), 2)),
      "patient_hash": patient,
    }
    boxes = np.asarray(entry["boxes"], np.float32).reshape(-1, 4)
    items_by_patient[patient].append(
      MilItem(
        rows=", ".join(f"line {n}" for n in entry["lines"]),
        order=line,
        path=path,
        laterality=laterality,
        fields=fields,
        source_boxes=boxes,
        preprocess=options.preprocess,
      )
    )
    outcomes[patient] = max(outcomes.get(patient, 0), int(entry["labels"].any()))
    if "split" in table.columns:
      declared[patient].extend((n, row["split"]) for n in entry["lines"])
  assignment = tabular.assign_patients(declared, outcomes, options.fractions, options.seed)
  splits = tabular.items_by_split(items_by_patient, assignment, options.fractions)
  config = {
    "task": "mil",
    "labels": list(options.labels),
    "preprocess": options.preprocess.to_dict(),
    "view_codes": VIEW_CODES,
    "split_seed": options.seed,
    "fractions": dict(options.fractions),
    "duplicates_dropped": len(dropped),
  }
  identifiers = {
    r[c] for r in table.rows for c in ("patient_id", "study_id", "image_id") if r.get(c)
  }
  return tabular.IngestPlan(
    splits=splits,
    errors=errors,
    config=config,
    stat_fields=("image",),
    redactor=tabular.Redactor(images_root, salt, frozenset(identifiers)),
  )


def _image_path(row: dict[str, str], line: int, root: str) -> str | None:
  """The row's resolved image path inside ``root``; None when no file matches patient_id /
  image_id. A path that leaves ``root`` raises ``ValueError``."""
  if row.get("image_path") or "patient_id" not in row or "image_id" not in row:
    return tabular.confined_path(root, row.get("image_path", ""), line, "image_path")
  stem = os.path.join(row["patient_id"], row["image_id"])
  tabular.confined_path(root, stem, line, "patient_id/image_id")
  for suffix in ("",) + IMAGE_SUFFIXES:
    if os.path.isfile(os.path.join(root, stem + suffix)):
      return tabular.confined_path(root, stem + suffix, line, "patient_id/image_id")
  return None


def _labels(row: dict[str, str], line: int, names: tuple[str, ...]) -> np.ndarray:
  out = np.zeros(len(names), np.float32)
  findings = None
  for i, name in enumerate(names):
    if name in row and not tabular.is_missing(row[name]):
      out[i] = float(tabular.parse_float(row[name], name, line) > 0)
    elif "finding_categories" in row:
      if findings is None:
        findings = {
          _norm(f) for f in re.findall(r"[A-Za-z][A-Za-z _-]*[A-Za-z]", row["finding_categories"])
        }
      out[i] = float(_norm(name) in findings)
  return out


def _norm(text: str) -> str:
  return re.sub(r"[\s_-]+", "_", text.strip().lower())
