"""Longitudinal mammography CSV: pair each exam with a prior, survival targets, patient splits.

The CSV has one row per image, with the columns public risk benchmarks use::

  patient_id, exam_id, ImageLaterality, view, study_date_year, Time_to_Cancer_Years,
  years_last_followup, density, cancer_type, race

plus optionally ``study_date`` (full date; gives fractional time gaps), ``image_path`` (relative to
the images root), ``split`` (train/val/test per patient) and ``prior_exam_id`` (an explicit prior).
Other columns are kept only when named in ``keep_columns`` (stored as ``meta_<column>``).
Without ``image_path`` the image is found by the benchmarks' file-name convention
``<patient_id>_<L|R>_<view>_<YYYY-MM-DD>_<n>.png`` anywhere under the images root.

An image path that leaves the images root (absolute, ``..``, a symlink to outside) is refused
with its line. Rows with the same patient, exam, laterality, view and image are duplicates:
refused naming both lines, or with ``duplicates='drop'`` all but the first are dropped (counted
in the manifest's ``duplicates_dropped``); such rows that differ in another column are refused.

Labels follow BCRBench: an empty ``Time_to_Cancer_Years`` means no cancer; ``t`` years to cancer
becomes the event index ``max(ceil(t) - 1, 0)`` ("within ``k + 1`` years"), so 0 and 1 both mean
the first year; follow-up below one year counts as one. The converted whole years are what
:func:`mammojax.data.survival.survival_targets` receives and what the record stores as
``years_to_cancer`` / ``years_to_followup`` (no cancer: ``NO_CANCER_YEARS``).

Record fields (one per current image and chosen prior):
  current_image, previous_image uint16 [H, W]; has_prior int32; time_gap float32 (years);
  years_to_cancer, years_to_followup float32; target, y_mask, target_prior, y_mask_prior
  float32 [num_years]; density int32 (0 unknown, 1-4 = BI-RADS a-d); cancer_type int32
  (``CANCER_TYPE_CODES``); patient_hash str; exam_index int32 (chronological position of the
  current exam in its patient / laterality / view series, 0 = earliest).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from collections import defaultdict
from typing import Any

import numpy as np

from mammojax.data.constants import NO_CANCER_YEARS
from mammojax.data.ingest import tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig, load_mammogram
from mammojax.data.survival import survival_targets

REQUIRED_COLUMNS = (
  "patient_id",
  "exam_id",
  "ImageLaterality",
  "view",
  "study_date_year",
  "Time_to_Cancer_Years",
  "years_last_followup",
  "density",
  "cancer_type",
  "race",
)
CANCER_TYPE_CODES = {
  0: "none or unknown",
  1: "invasive",
  2: "in situ (non-invasive)",
  3: "malignant, type unspecified",
}
_CANCER_TYPE_WORDS = (
  (("non-invasive", "noninvasive", "non invasive", "in situ", "insitu", "dcis", "lcis"), 2),
  (("invasive", "idc", "ilc"), 1),
  (("malignant", "cancer", "other"), 3),
)
_DENSITY = {"1": 1, "2": 2, "3": 3, "4": 4, "a": 1, "b": 2, "c": 3, "d": 4}
FILENAME_PATTERN = re.compile(
  r"^(?P<patient>.+?)_(?P<side>[LR])_(?P<view>[A-Za-z0-9]+)_(?P<date>\d{4}-\d{2}-\d{2})_"
  r"(?P<rest>.+)\.png$"
)
PRIOR_MODES = ("latest", "all")


@dataclasses.dataclass(frozen=True)
class LongitudinalOptions:
  """Pairing, labelling and split settings.

  Attributes:
    num_years: horizon of the cumulative risk targets.
    prior: 'latest' (the most recent eligible prior) or 'all' (one record per eligible prior).
    min_gap_years: priors closer than this to the current exam are not eligible.
    missing_prior: 'keep' (record with has_prior 0) or 'drop' exams without an eligible prior.
    fractions: split name -> fraction of patients, used when the CSV has no ``split`` column.
    seed: split permutation seed.
    keep_columns: extra CSV columns copied into records as ``meta_<column>`` strings.
    preprocess: mammogram preprocessing settings.
    duplicates: 'error' (refuse repeated rows) or 'drop' (keep the first of identical rows).
  """

  num_years: int = 5
  prior: str = "latest"
  min_gap_years: float = 0.0
  missing_prior: str = "keep"
  fractions: tuple[tuple[str, float], ...] = (("train", 0.7), ("val", 0.1), ("test", 0.2))
  seed: int = 0
  keep_columns: tuple[str, ...] = ()
  preprocess: MammoPreprocessConfig = MammoPreprocessConfig()
  duplicates: str = "error"

  def __post_init__(self):
    if self.duplicates not in tabular.DUPLICATE_MODES:
      raise ValueError(
        f"duplicates must be one of {tabular.DUPLICATE_MODES}, got {self.duplicates!r}"
      )
    if self.prior not in PRIOR_MODES:
      raise ValueError(f"prior must be one of {PRIOR_MODES}, got {self.prior!r}")
    if self.missing_prior not in ("keep", "drop"):
      raise ValueError(f"missing_prior must be 'keep' or 'drop', got {self.missing_prior!r}")
    if self.num_years < 1 or self.min_gap_years < 0:
      raise ValueError("num_years must be >= 1 and min_gap_years >= 0")


@dataclasses.dataclass(frozen=True)
class ExamImage:
  """One parsed CSV row."""

  line: int
  patient_id: str
  exam_id: str
  laterality: str
  view: str
  time: float  # years on a common axis (fractional when the full date is known)
  years_to_cancer: float
  years_to_followup: float
  density: int
  cancer_type: int
  path: str
  split: str
  prior_exam_id: str
  meta: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class PairItem:
  """Work item: one current image, its prior (or none) and the record's other fields."""

  rows: str
  order: tuple[int, int]
  current_path: str
  current_laterality: str
  prior_path: str | None
  prior_laterality: str | None
  fields: dict[str, Any]
  preprocess: MammoPreprocessConfig

  @property
  def files(self) -> tuple[str, ...]:
    return (self.current_path,) + ((self.prior_path,) if self.prior_path else ())

  def build(self) -> dict[str, Any]:
    current, _ = load_mammogram(self.current_path, self.current_laterality, self.preprocess)
    if self.prior_path is None:
      previous = np.zeros_like(current)
    else:
      previous, _ = load_mammogram(self.prior_path, self.prior_laterality, self.preprocess)
    return {"current_image": current, "previous_image": previous, **self.fields}


def survival_years(time_to_cancer: float, years_last_followup: float) -> tuple[float, float]:
  """CSV years -> (years_to_cancer, years_to_followup) for ``survival_targets``."""
  if math.isnan(time_to_cancer):
    to_cancer = NO_CANCER_YEARS
  else:
    to_cancer = float(max(math.ceil(time_to_cancer) - 1, 0))
  return to_cancer, float(max(math.floor(years_last_followup), 1))


def parse_density(value: str) -> int:
  """BI-RADS density as 1-4 (a-d); 0 when missing or unrecognised."""
  text = value.strip().lower()
  try:
    text = str(int(float(text)))
  except ValueError:
    pass
  return _DENSITY.get(text, 0)


def parse_cancer_type(value: str, line: int) -> int:
  """Maps a cancer-type cell to ``CANCER_TYPE_CODES``; numbers 0-3 are taken as codes."""
  text = value.strip().lower()
  if tabular.is_missing(text) or text in ("0", "no", "negative", "unknown"):
    return 0
  try:
    code = int(float(text))
  except ValueError:
    for words, code in _CANCER_TYPE_WORDS:
      if any(w in text for w in words):
        return code
  else:
    if code in CANCER_TYPE_CODES:
      return code
  raise ValueError(
    f"line {line}: cancer_type {value!r} is not in the code table "
    f"{CANCER_TYPE_CODES}; map the column to these codes or words"
  )


def plan(
  csv_path: str, images_root: str, options: LongitudinalOptions, salt: str
) -> tabular.IngestPlan:
  """Parses the CSV, finds images, pairs priors and assigns splits.

  Raises:
    ValueError: a missing images folder, a missing column, an unparsable cell, an image path
      outside the images folder, a duplicated row (unless dropped), a negative time gap, a
      patient in two splits. Missing image files do not raise: they are returned in
      ``plan.errors``.
  """
  images_root = tabular.images_root(images_root)
  table = tabular.read_table(csv_path, REQUIRED_COLUMNS)
  for column in options.keep_columns:
    if column not in table.columns:
      raise ValueError(
        f"{csv_path}: keep_columns names {column!r}, which is not a column; "
        f"the CSV has {list(table.columns)}"
      )
  errors: list[tabular.ErrorRow] = []
  finder = None if "image_path" in table.columns else _ConventionFinder(images_root)
  parsed = []
  for row, line in zip(table.rows, table.lines):
    exam = _parse_row(row, line, table.columns, images_root, finder, options, errors)
    if exam is not None:
      parsed.append((exam, row))
  dropped = tabular.duplicate_lines(
    (
      (
        e.line,
        (e.patient_id, e.exam_id, e.laterality, e.view, e.path),
        {c: v for c, v in row.items() if c != "image_path"},
      )
      for e, row in parsed
    ),
    options.duplicates,
    "patient, exam, laterality, view and image",
  )
  exams = []
  for exam, _ in parsed:
    if exam.line in dropped:
      continue
    if not os.path.isfile(exam.path):
      errors.append(tabular.ErrorRow(f"line {exam.line}", exam.path, "file does not exist"))
      continue
    exams.append(exam)

  series = defaultdict(list)
  for exam in exams:
    series[(exam.patient_id, exam.laterality, exam.view)].append(exam)
  items_by_patient = defaultdict(list)
  for key in sorted(series, key=lambda k: min(e.line for e in series[k])):
    ordered = sorted(series[key], key=lambda e: (e.time, e.exam_id, e.line))
    for index, exam in enumerate(ordered):
      for prior, gap in _priors(exam, ordered[:index], ordered, options, salt):
        items_by_patient[exam.patient_id].append(_item(exam, prior, gap, index, options, salt))

  patients = sorted({e.patient_id for e in exams})
  if "split" in table.columns:
    declared = defaultdict(list)
    for exam in exams:
      declared[exam.patient_id].append((exam.line, exam.split))
    hashed = tabular.split_from_column(
      {tabular.pseudonym(p, salt): v for p, v in declared.items()}, "split"
    )
    assignment = {p: hashed[tabular.pseudonym(p, salt)] for p in patients}
  else:
    outcomes = {p: 0 for p in patients}
    for exam in exams:
      if exam.years_to_cancer < options.num_years:
        outcomes[exam.patient_id] = 1
    assignment = tabular.stratified_patient_split(outcomes, dict(options.fractions), options.seed)
  splits: dict[str, list[PairItem]] = tabular.items_by_split(
    {p: items_by_patient[p] for p in patients}, assignment, options.fractions
  )
  config = {
    "task": "longitudinal",
    "num_years": options.num_years,
    "prior": options.prior,
    "min_gap_years": options.min_gap_years,
    "missing_prior": options.missing_prior,
    "split_seed": options.seed,
    "fractions": dict(options.fractions),
    "keep_columns": list(options.keep_columns),
    "preprocess": options.preprocess.to_dict(),
    "no_cancer_years": NO_CANCER_YEARS,
    "cancer_type_codes": CANCER_TYPE_CODES,
    "density_codes": {0: "unknown", 1: "a", 2: "b", 3: "c", 4: "d"},
    "patients": {n: sum(1 for p in patients if assignment[p] == n) for n in splits},
    "duplicates_dropped": len(dropped),
  }
  identifiers = {r[c] for r in table.rows for c in ("patient_id", "exam_id")}
  return tabular.IngestPlan(
    splits=splits,
    errors=errors,
    config=config,
    stat_fields=("current_image",),
    redactor=tabular.Redactor(images_root, salt, frozenset(identifiers)),
  )


def _parse_row(
  row: dict[str, str],
  line: int,
  columns: tuple[str, ...],
  images_root: str,
  finder: _ConventionFinder | None,
  options: LongitudinalOptions,
  errors: list[tabular.ErrorRow],
) -> ExamImage | None:
  patient = row["patient_id"]
  if not patient:
    raise ValueError(f"line {line}: patient_id is empty")
  laterality = row["ImageLaterality"].upper()[:1]
  if laterality not in ("L", "R"):
    raise ValueError(f"line {line}: ImageLaterality is {row['ImageLaterality']!r}; use L or R")
  view = row["view"].upper()
  year = tabular.parse_float(row["study_date_year"], "study_date_year", line)
  date = None
  if "study_date" in columns and not tabular.is_missing(row["study_date"]):
    date = tabular.parse_date(row["study_date"], "study_date", line)
    if date.year != int(year):
      raise ValueError(
        f"line {line}: study_date {date} disagrees with study_date_year "
        f"{int(year)}; fix one of them"
      )
  time = (date.toordinal() / 365.25) if date else year
  to_cancer = tabular.parse_float(
    row["Time_to_Cancer_Years"], "Time_to_Cancer_Years", line, allow_missing=True, minimum=0.0
  )
  followup = tabular.parse_float(
    row["years_last_followup"], "years_last_followup", line, minimum=0.0
  )
  to_cancer, followup = survival_years(to_cancer, followup)
  if "image_path" in columns:
    path = tabular.confined_path(images_root, row["image_path"], line, "image_path")
  else:
    path, problem = finder.find(patient, laterality, view, date, int(year))
    if problem:
      errors.append(tabular.ErrorRow(rows=f"line {line}", file=path, reason=problem))
      return None
    path = tabular.confined_path(
      images_root, os.path.relpath(path, images_root), line, "file found by the name convention"
    )
  return ExamImage(
    line=line,
    patient_id=patient,
    exam_id=row["exam_id"],
    laterality=laterality,
    view=view,
    time=time,
    years_to_cancer=to_cancer,
    years_to_followup=followup,
    density=parse_density(row["density"]),
    cancer_type=parse_cancer_type(row["cancer_type"], line),
    path=path,
    split=row.get("split", ""),
    prior_exam_id=row.get("prior_exam_id", ""),
    meta=tuple((c, row[c]) for c in options.keep_columns),
  )


def _priors(
  exam: ExamImage,
  earlier: list[ExamImage],
  series: list[ExamImage],
  options: LongitudinalOptions,
  salt: str,
):
  """Yields (prior or None, gap in years) pairs for one current exam."""
  if exam.prior_exam_id and not tabular.is_missing(exam.prior_exam_id):
    named = [e for e in series if e.exam_id == exam.prior_exam_id]
    if not named:
      raise ValueError(
        f"line {exam.line}: the exam named by prior_exam_id has no row of "
        "the same patient, laterality and view; fix prior_exam_id or leave it "
        "empty"
      )
    prior = named[0]
    gap = exam.time - prior.time
    if gap < 0:
      raise ValueError(
        f"line {exam.line} (patient {tabular.pseudonym(exam.patient_id, salt)[:12]}): the "
        f"prior exam named by prior_exam_id (line {prior.line}) is dated {-gap:.2f} years "
        "after the current exam, a negative time gap; fix study_date / study_date_year or "
        "prior_exam_id"
      )
    yield prior, gap
    return
  eligible = [(e, exam.time - e.time) for e in earlier if e.exam_id != exam.exam_id]
  eligible = [(e, g) for e, g in eligible if g >= options.min_gap_years]
  if not eligible:
    if options.missing_prior == "keep":
      yield None, 0.0
    return
  if options.prior == "latest":
    yield eligible[-1]
  else:
    yield from reversed(eligible)


def _item(
  exam: ExamImage,
  prior: ExamImage | None,
  gap: float,
  index: int,
  options: LongitudinalOptions,
  salt: str,
) -> PairItem:
  target, mask = survival_targets(exam.years_to_cancer, exam.years_to_followup, options.num_years)
  if prior is None:
    target_prior = np.zeros(options.num_years, np.float32)
    mask_prior = np.zeros(options.num_years, np.float32)
  else:
    target_prior, mask_prior = survival_targets(
      prior.years_to_cancer, prior.years_to_followup, options.num_years
    )
  fields = {
    "has_prior": np.int32(prior is not None),
    "time_gap": np.float32(gap),
    "years_to_cancer": np.float32(exam.years_to_cancer),
    "years_to_followup": np.float32(exam.years_to_followup),
    "target": target,
    "y_mask": mask,
    "target_prior": target_prior,
    "y_mask_prior": mask_prior,
    "density": np.int32(exam.density),
    "cancer_type": np.int32(exam.cancer_type),
    "patient_hash": tabular.pseudonym(exam.patient_id, salt),
    "exam_index": np.int32(index),
  }
  fields.update({f"meta_{c}": v for c, v in exam.meta})
  rows = f"line {exam.line}" + (f" (prior line {prior.line})" if prior else "")
  return PairItem(
    rows=rows,
    order=(exam.line, prior.line if prior else 0),
    current_path=exam.path,
    current_laterality=exam.laterality,
    prior_path=prior.path if prior else None,
    prior_laterality=prior.laterality if prior else None,
    fields=fields,
    preprocess=options.preprocess,
  )


class _ConventionFinder:
  """Finds images named ``<patient_id>_<L|R>_<view>_<YYYY-MM-DD>_<n>.png`` under a root."""

  def __init__(self, root: str):
    self.root = root
    self.index: dict[tuple[str, str, str], list[tuple[datetime.date, str]]] = defaultdict(list)
    for directory, subdirs, files in os.walk(root):
      subdirs.sort()
      for name in sorted(files):
        match = FILENAME_PATTERN.match(name)
        if match is None:
          continue
        try:
          date = datetime.date.fromisoformat(match["date"])
        except ValueError:
          continue
        key = (match["patient"], match["side"], match["view"].upper())
        self.index[key].append((date, os.path.join(directory, name)))

  def find(
    self, patient: str, side: str, view: str, date: datetime.date | None, year: int
  ) -> tuple[str, str]:
    """Returns (path, '') or (pattern, reason it was not found uniquely)."""
    pattern = os.path.join(
      self.root, f"{patient}_{side}_{view}_{date.isoformat() if date else f'{year}-??-??'}_<n>.png"
    )
    candidates = [
      p
      for d, p in self.index.get((patient, side, view), ())
      if (d == date if date else d.year == year)
    ]
    if not candidates:
      return pattern, (
        "no image file matches the name convention; add an image_path column or rename the file"
      )
    if len(candidates) > 1:
      return pattern, (
        f"{len(candidates)} image files match; add an image_path column (or a "
        "study_date column) to say which"
      )
    return candidates[0], ""
