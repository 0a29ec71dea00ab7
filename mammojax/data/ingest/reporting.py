"""How ingest names what went wrong without identifiers, and what it warns about.

File names often carry the patient id (``MRN1234567_2019.dcm``), so a failed input is never
shown by its path: :class:`ErrorRow` (what an ingester finds, in memory) becomes a
:class:`ReportedError` (what ``DIR/errors.csv`` and the log show) naming the CSV line(s) and
``file_ref``, a short salted digest of the path relative to the images folder, with every
spelling of the path and every CSV identifier in the reason replaced.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mammojax.atomic_files import atomic_write

FILE_REF_DIGITS = 12
# Identifiers shorter than this are not scrubbed from error reasons (they would match words).
MIN_SCRUBBED_IDENTIFIER = 4


@dataclasses.dataclass(frozen=True)
class ErrorRow:
  """One input that could not be ingested, as the ingesters find it (in memory only).

  Attributes:
    rows: the CSV line(s), e.g. ``'line 4 (prior line 2)'``.
    file: the source path; it may hold identifiers (file names often carry the patient id), so
      it is never written: :class:`Redactor` turns it into a :class:`ReportedError`.
    reason: what is wrong; it may name the path.
  """

  rows: str
  file: str
  reason: str


@dataclasses.dataclass(frozen=True)
class ReportedError:
  """An :class:`ErrorRow` as ``DIR/errors.csv`` and the log show it: the CSV line(s), a salted
  reference to the file (:func:`file_ref`) and the reason with every spelling of the path
  replaced by ``<file>`` and every CSV identifier by ``<id>``."""

  rows: str
  file_ref: str
  reason: str

  def line(self) -> str:
    return f"{self.rows}: file {self.file_ref}: {self.reason}"


def file_ref(path: str, root: str, salt: str) -> str:
  """Short salted reference to a file: the first hex digits of the salted SHA-256 of its path
  relative to the images folder. With the salt (``DIR/salt.txt``) a user can recompute it for a
  candidate file; without it the reference reveals nothing about the name."""
  real_root = os.path.realpath(root)
  absolute = os.path.realpath(os.path.join(real_root, path)) if path else real_root
  relative = os.path.relpath(absolute, real_root).replace(os.sep, "/")
  # The formula of tabular.pseudonym (patient ids) with a prefix: a file and a patient never
  # share a digest.
  digest = hashlib.sha256(f"{salt}\x00file\x00{relative}".encode()).hexdigest()
  return digest[:FILE_REF_DIGITS]


@dataclasses.dataclass(frozen=True)
class Redactor:
  """Turns :class:`ErrorRow` s into :class:`ReportedError` s that carry no path and no identifier.

  Attributes:
    root: the images folder the file references are relative to.
    salt: the ingest salt (the patient pseudonyms' salt).
    identifiers: raw identifiers of the CSV (patient ids, exam ids, ...) scrubbed from reasons
      wherever they occur (those of at least ``MIN_SCRUBBED_IDENTIFIER`` characters).
  """

  root: str
  salt: str = dataclasses.field(repr=False)
  identifiers: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

  def __call__(self, error: ErrorRow, paths: Sequence[str] = ()) -> ReportedError:
    """``error`` without its path; ``paths`` (the work item's other files) are scrubbed from the
    reason as well."""
    ref = file_ref(error.file, self.root, self.salt) if error.file else "-"
    reason = self.scrub(error.reason, (error.file, *paths))
    return ReportedError(rows=error.rows, file_ref=ref, reason=reason)

  def scrub(self, text: str, paths: Sequence[str] = ()) -> str:
    """``text`` with every spelling of ``paths`` (as given, absolute, resolved, relative to the
    root, the names of their file and folders below the root, with and without suffix) replaced
    by ``<file>`` and every identifier by ``<id>``."""
    real_root = os.path.realpath(self.root)
    forms = set()
    for path in filter(None, paths):
      joined = os.path.join(self.root, path)
      resolved = os.path.realpath(joined)
      relative = os.path.relpath(resolved, real_root)
      forms |= {path, joined, os.path.abspath(joined), resolved, relative}
      for part in relative.split(os.sep):  # not the root's folders: they name no patient
        if part not in ("", ".", ".."):
          forms |= {part, part.split(".")[0]}
    forms = {f for f in forms if len(f) >= MIN_SCRUBBED_IDENTIFIER}
    for form in sorted(forms, key=len, reverse=True):
      text = text.replace(form, "<file>")
    for identifier in sorted(self.identifiers, key=len, reverse=True):
      if len(identifier) >= MIN_SCRUBBED_IDENTIFIER:
        text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(identifier)}(?![0-9A-Za-z])", "<id>", text)
    return text


def write_errors(path: str, errors: Sequence[ReportedError]) -> None:
  """Writes ``errors.csv`` (columns rows, file_ref, reason) atomically."""
  with atomic_write(path, newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["rows", "file_ref", "reason"])
    for e in errors:
      writer.writerow([e.rows, e.file_ref, e.reason])


def empty_split_warning(records: Mapping[str, int], splits: Mapping[str, Sequence[Any]]) -> str:
  """The warning for splits without records ('' when there are none): an empty val or test split
  (too few patients for its fraction, or every input of it failed) has no data for a run.

  Args:
    records: split -> records written.
    splits: split -> the plan's work items (they carry ``fields['patient_hash']`` or
      ``subject_hash``), for the patient counts.
  """
  empty = [name for name, count in records.items() if count == 0]
  if not empty:
    return ""
  counts = ", ".join(f"{k} {v}" for k, v in records.items())
  patients = ", ".join(f"{k} {len({_patient(i) for i in v})}" for k, v in splits.items())
  one = len(empty) == 1
  return (
    f"the {', '.join(empty)} split{' is' if one else 's are'} empty (records: {counts}; "
    f"patients: {patients}); a run that trains or evaluates on {'it' if one else 'them'} has "
    "no data: add patients or change --split"
  )


def _patient(item: Any) -> str:
  fields = getattr(item, "fields", {})
  return fields.get("patient_hash") or getattr(item, "subject_hash", None) or item.rows
