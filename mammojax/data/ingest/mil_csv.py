"""VinDr-style MIL CSV: one mammogram per record with image-level labels and lesion boxes.

Columns: ``laterality`` (L/R), ``view``, the image-level label columns (default ``Mass``,
``Suspicious_Calcification``; 0/1), and the image as ``image_path`` (relative to the images
root) or ``patient_id`` + ``image_id`` (``ROOT/<patient_id>/<image_id>.png|.dcm``, the layout of
the public VinDr PNG export). A label column may instead come from a ``finding_categories``
column listing findings (``"['Mass', 'Suspicious Calcification']"``). Optional: ``split``
(training/test), ``patient_id`` or ``study_id`` (pseudonymised; the split unit), and lesion boxes
``xmin, ymin, xmax, ymax`` in source pixels. Several rows may describe the same image (one per
lesion, as VinDr does): labels are OR-ed and boxes collected.

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
  """Attributes: label column names, split fractions / seed, preprocessing."""

  labels: tuple[str, ...] = ("Mass", "Suspicious_Calcification")
  fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
  seed: int = 0
  preprocess: MammoPreprocessConfig = MammoPreprocessConfig()


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
  images: dict[str, dict[str, Any]] = {}
  for row, line in zip(table.rows, table.lines):
    path = _image_path(row, images_root)
    if path is None:
      errors.append(
        tabular.ErrorRow(
          f"line {line}",
          os.path.join(images_root, row.get("patient_id", ""), row.get("image_id", "")),
          "no .png/.dcm file for this patient_id / image_id",
        )
      )
      continue
    entry = images.setdefault(
      path, {"lines": [], "labels": np.zeros(len(options.labels)), "boxes": [], "row": row}
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
  }
  return tabular.IngestPlan(splits=splits, errors=errors, config=config, stat_fields=("image",))


def _image_path(row: dict[str, str], root: str) -> str | None:
  if row.get("image_path"):
    return os.path.join(root, row["image_path"])
  stem = os.path.join(root, row["patient_id"], row["image_id"])
  for suffix in ("",) + IMAGE_SUFFIXES:
    if os.path.isfile(stem + suffix):
      return stem + suffix
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
