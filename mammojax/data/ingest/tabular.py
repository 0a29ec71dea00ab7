"""Shared pieces of the CSV ingesters: reading with column checks, pseudonyms, patient splits,
image paths confined to the images folder, duplicate rows (error rows: :mod:`reporting`).

Nothing here touches pixels. Row numbers are the CSV's line numbers (the header is line 1), so an
error message points at the line a user opens in an editor.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import secrets
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mammojax.atomic_files import atomic_write
from mammojax.data.ingest.reporting import ErrorRow, Redactor, ReportedError

SALT_FILE = "salt.txt"
SPLIT_ALIASES = {
  "train": "train",
  "training": "train",
  "val": "val",
  "valid": "val",
  "validation": "val",
  "dev": "val",
  "test": "test",
  "testing": "test",
}
MISSING = ("", "nan", "na", "n/a", "none", "null")
DUPLICATE_MODES = ("error", "drop")


@dataclasses.dataclass(frozen=True)
class Table:
  """A CSV file: its header and rows (stripped strings), each with its line number."""

  path: str
  columns: tuple[str, ...]
  rows: tuple[dict[str, str], ...]
  lines: tuple[int, ...]


def read_table(path: str, required: Sequence[str]) -> Table:
  """Reads a CSV; raises ``ValueError`` naming any required column it lacks."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CSV file {path} does not exist")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    columns = tuple(c.strip() for c in (reader.fieldnames or ()))
    rows, lines = [], []
    for row in reader:
      rows.append({k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
      lines.append(reader.line_num)
  missing = [c for c in required if c not in columns]
  if missing:
    raise ValueError(
      f"{path}: missing required column(s) {', '.join(map(repr, missing))}; "
      f"the CSV has columns {list(columns)}. Add or rename the column(s)."
    )
  if not rows:
    raise ValueError(f"{path}: the CSV has a header but no rows")
  return Table(path=path, columns=columns, rows=tuple(rows), lines=tuple(lines))


def is_missing(value: str) -> bool:
  return value.strip().lower() in MISSING


def parse_float(
  value: str, column: str, line: int, *, allow_missing: bool = False, minimum: float | None = None
) -> float:
  """Parses a number; missing values become NaN when allowed, otherwise a clear error."""
  if is_missing(value):
    if allow_missing:
      return math.nan
    raise ValueError(f"line {line}: column {column!r} is empty; it needs a number")
  try:
    number = float(value)
  except ValueError:
    raise ValueError(f"line {line}: column {column!r} holds {value!r}, not a number") from None
  if not math.isfinite(number):
    raise ValueError(f"line {line}: column {column!r} holds {value!r}, not a finite number")
  if minimum is not None and number < minimum:
    raise ValueError(f"line {line}: column {column!r} is {number}, below the minimum {minimum}")
  return number


def parse_date(value: str, column: str, line: int) -> datetime.date:
  """Parses an ISO date (``YYYY-MM-DD``, optionally followed by a time) or ``YYYYMMDD``."""
  text = value.strip()
  for fmt, length in (("%Y-%m-%d", 10), ("%Y%m%d", 8), ("%Y/%m/%d", 10)):
    try:
      return datetime.datetime.strptime(text[:length], fmt).date()
    except ValueError:
      continue
  raise ValueError(f"line {line}: column {column!r} holds {value!r}, not a date (use YYYY-MM-DD)")


def years_between(earlier: datetime.date, later: datetime.date) -> float:
  """Signed difference ``later - earlier`` in years of 365.25 days."""
  return (later - earlier).days / 365.25


def load_salt(out_dir: str, salt: str | None) -> tuple[str, bool]:
  """The pseudonymisation salt and whether it is new (to be kept with :func:`store_salt`).

  Order: the given salt, else ``DIR/salt.txt`` from an earlier run, else a fresh random one. The
  salt file stays next to the shards so a rerun produces the same pseudonyms; it is never
  written into the manifest or any record. Keep it private, or delete it to make the pseudonyms
  unlinkable.
  """
  if salt:
    return salt, False
  path = os.path.join(out_dir, SALT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stored = f.read().strip()
    if stored:
      return stored, False
  return secrets.token_hex(16), True


def store_salt(out_dir: str, salt: str) -> None:
  """Writes ``DIR/salt.txt`` (owner-readable only) atomically."""
  os.makedirs(out_dir, exist_ok=True)
  with atomic_write(os.path.join(out_dir, SALT_FILE), permissions=0o600) as f:
    f.write(salt + "\n")


def pseudonym(identifier: str, salt: str) -> str:
  """Salted SHA-256 (hex) of an identifier such as a patient id."""
  return hashlib.sha256(f"{salt}\x00{identifier}".encode()).hexdigest()


def images_root(root: str) -> str:
  """The real path (symlinks resolved) of the images folder.

  Raises:
    ValueError: ``root`` is not an existing folder.
  """
  if not root or not os.path.isdir(root):
    raise ValueError(f"--images={root}: the images folder does not exist or is not a folder")
  return os.path.realpath(root)


def confined_path(root: str, relative: str, line: int, column: str) -> str:
  """Joins a CSV cell to the images folder, refusing a path that leaves it.

  Both the folder and the joined path are resolved (``os.path.realpath``: ``..`` and symlinks)
  before the check, so neither an absolute path, nor ``..``, nor a symlink inside the folder
  pointing outside reaches a reader.

  Args:
    root: the images folder.
    relative: the cell (or cells joined) naming the file relative to ``root``.
    line: CSV line, for the message.
    column: the column(s) the path came from, for the message.

  Returns:
    The resolved path inside ``root`` (it need not exist).

  Raises:
    ValueError: naming the line and column, not the path (it may hold identifiers).
  """
  if not relative:
    raise ValueError(f"line {line}: column {column!r} is empty; it needs a path under --images")
  if "\x00" in relative:
    raise ValueError(f"line {line}: column {column!r} holds a NUL character; fix the path")
  real_root = os.path.realpath(root)
  path = os.path.realpath(os.path.join(real_root, relative))
  if os.path.commonpath([real_root, path]) != real_root:
    raise ValueError(
      f"line {line}: column {column!r} names a file outside the --images folder (an absolute "
      "path, '..' or a symlink that leaves it); image paths must be relative to --images and "
      "stay inside it"
    )
  return path


def duplicate_lines(
  rows: Iterable[tuple[int, Hashable, Mapping[str, str]]], mode: str, what: str
) -> set[int]:
  """Finds repeated rows: the lines to skip under ``mode='drop'``.

  Args:
    rows: ``(line, identity, cells)`` per row; ``identity`` says which rows describe the same
      thing (e.g. patient, exam, laterality, view and resolved image path), ``cells`` are the
      row's other values compared between such rows.
    mode: ``'error'`` refuses any repeated row; ``'drop'`` keeps the first of identical rows.
    what: what the identity is, for messages (``'patient, exam, laterality, view and image'``).

  Raises:
    ValueError: naming both lines, for a repeated row under ``'error'``, and under either mode
      for rows of one identity that differ elsewhere (naming the columns, not the values).
  """
  if mode not in DUPLICATE_MODES:
    raise ValueError(f"duplicates must be one of {DUPLICATE_MODES}, got {mode!r}")
  first: dict[Hashable, tuple[int, Mapping[str, str]]] = {}
  skip = set()
  for line, identity, cells in rows:
    if identity not in first:
      first[identity] = (line, cells)
      continue
    earlier, earlier_cells = first[identity]
    differ = sorted(
      c for c in set(cells) | set(earlier_cells) if cells.get(c) != earlier_cells.get(c)
    )
    if differ:
      raise ValueError(
        f"lines {earlier} and {line} have the same {what} but differ in column(s) "
        f"{', '.join(map(repr, differ))}; keep one row"
      )
    if mode == "error":
      raise ValueError(
        f"lines {earlier} and {line} are duplicates (the same {what}); remove one, or pass "
        "--duplicates=drop to keep the first of identical rows"
      )
    skip.add(line)
  return skip


def fingerprint_inputs(csv_path: str, settings: dict[str, Any], salt: str) -> str:
  """Digest of the CSV bytes, the settings and the salt (the salt itself is not recoverable)."""
  h = hashlib.sha256()
  with open(csv_path, "rb") as f:
    h.update(f.read())
  h.update(json.dumps(settings, sort_keys=True, default=str).encode())
  h.update(hashlib.sha256(salt.encode()).digest())
  return h.hexdigest()


def parse_size(text: str | None, dims: int) -> tuple[int, ...]:
  """``'1024x832'`` -> (1024, 832); the number of dimensions must match the task."""
  if text is None:
    return (1024, 832) if dims == 2 else (96, 96, 96)
  try:
    size = tuple(int(p) for p in text.lower().split("x"))
  except ValueError:
    size = ()
  if len(size) != dims or min(size) < 1:
    want = "HxW" if dims == 2 else "DxHxW"
    raise ValueError(f"--size={text!r}: expected {want} with positive integers")
  return size


def parse_fractions(text: str) -> dict[str, float]:
  """``'train=0.7,val=0.1,test=0.2'`` -> dict; the fractions must sum to 1."""
  fractions = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    name = SPLIT_ALIASES.get(name.strip().lower(), name.strip())
    try:
      fractions[name] = float(value)
    except ValueError:
      raise ValueError(f"split fractions {text!r}: {part!r} is not name=fraction") from None
  if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
    raise ValueError(f"split fractions {text!r} must be >= 0 and sum to 1")
  return fractions


def stratified_patient_split(
  outcomes: Mapping[str, int], fractions: Mapping[str, float], seed: int
) -> dict[str, str]:
  """Assigns every patient to one split, keeping the outcome mix in each split.

  Args:
    outcomes: patient key -> outcome stratum (for example 1 if any exam leads to cancer).
    fractions: split name -> fraction of patients (in the order the splits are listed).
    seed: permutation seed; the result depends only on it and the patient keys.
  """
  names = list(fractions)
  assignment = {}
  rng = np.random.default_rng(seed)
  for stratum in sorted(set(outcomes.values())):
    members = sorted(k for k, v in outcomes.items() if v == stratum)
    members = [members[i] for i in rng.permutation(len(members))]
    counts = _largest_remainder([fractions[n] * len(members) for n in names])
    start = 0
    for name, count in zip(names, counts):
      for key in members[start : start + count]:
        assignment[key] = name
      start += count
  return assignment


def assign_patients(
  declared: Mapping[str, Sequence[tuple[int, str]]],
  outcomes: Mapping[str, int],
  fractions: Sequence[tuple[str, float]],
  seed: int,
) -> dict[str, str]:
  """Patient key -> split: from the CSV ``split`` column when it was given (``declared``
  non-empty), else a seeded split of ``outcomes``' patients stratified by outcome."""
  if declared:
    return split_from_column(declared, "split")
  return stratified_patient_split(outcomes, dict(fractions), seed)


def items_by_split(
  items_by_key: Mapping[str, Sequence[Any]],
  assignment: Mapping[str, str],
  fractions: Sequence[tuple[str, float]],
) -> dict[str, list[Any]]:
  """Split name -> the items of its patients sorted by ``item.order``; the configured splits
  come first (possibly empty), then any other split named in a ``split`` column."""
  names = [n for n, _ in fractions]
  names += sorted(set(assignment.values()) - set(names))
  return {
    n: sorted(
      (i for key, items in items_by_key.items() if assignment[key] == n for i in items),
      key=lambda i: i.order,
    )
    for n in names
  }


def split_from_column(
  values: Mapping[str, Sequence[tuple[int, str]]], column: str
) -> dict[str, str]:
  """Patient key -> split from a CSV ``split`` column, refusing patients in two splits.

  Args:
    values: patient key (already pseudonymised) -> [(line, split value), ...].
    column: the column's name, for messages.
  """
  assignment = {}
  for key, entries in values.items():
    seen = {}
    for line, value in entries:
      name = SPLIT_ALIASES.get(value.strip().lower())
      if name is None:
        raise ValueError(
          f"line {line}: column {column!r} holds {value!r}; use one of "
          f"{sorted(set(SPLIT_ALIASES.values()))}"
        )
      seen.setdefault(name, line)
    if len(seen) > 1:
      where = ", ".join(f"{n} (line {at})" for n, at in seen.items())
      raise ValueError(
        f"patient {key[:12]} appears in several splits: {where}; a patient "
        "must be in one split only (fix the split column)"
      )
    assignment[key] = next(iter(seen))
  return assignment


def _largest_remainder(quotas: Sequence[float]) -> list[int]:
  counts = [int(math.floor(q)) for q in quotas]
  short = int(round(sum(quotas))) - sum(counts)
  order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
  for i in order[:short]:
    counts[i] += 1
  return counts


@dataclasses.dataclass
class IngestPlan:
  """What an ingester will write: work items per split, inputs already rejected, and config.

  Attributes:
    splits: split name -> work items in output order. An item is a picklable object with
      ``rows`` (str, the CSV lines it came from), ``files`` (tuple of source paths) and
      ``build() -> dict`` (one record; raises ``ImageReadError`` or ``ValueError`` for a bad
      input).
    errors: inputs rejected while planning (missing files, ambiguous names).
    config: task settings recorded in the manifest (``duplicates_dropped`` counts the rows
      dropped under ``--duplicates=drop``).
    stat_fields: uint16 record fields whose pixels give the normalisation statistics.
    redactor: names the failed files in errors.csv and logs without paths or identifiers; None
      (a plan built by hand) refers to paths relative to the filesystem root with an empty salt.
  """

  splits: dict[str, list]
  errors: list[ErrorRow]
  config: dict
  stat_fields: tuple[str, ...] = ()
  redactor: Redactor | None = None

  def redact(self, error: ErrorRow, paths: Sequence[str] = ()) -> ReportedError:
    """``error`` as errors.csv and the log show it (``paths``: other files to scrub)."""
    return (self.redactor or Redactor(root=os.sep, salt=""))(error, paths)


def run_item(item) -> tuple[str, object]:
  """Builds one work item: ``('ok', record)`` or ``('error', ErrorRow)`` for a bad input.

  Lives here (free of jax imports) so spawned ingestion workers start quickly.
  """
  from mammojax.data.ingest.readers import ImageReadError

  try:
    return "ok", item.build()
  except ImageReadError as e:
    return "error", ErrorRow(rows=item.rows, file=e.path, reason=e.reason)
  except (ValueError, OSError) as e:
    return "error", ErrorRow(rows=item.rows, file=item.files[0], reason=f"{type(e).__name__}: {e}")
