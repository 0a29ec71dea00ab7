r"""Ingest real images + CSV metadata into mammojax ArrayRecord shards.

  python -m mammojax.ingest --csv=META.csv --images=ROOT --out=DIR \
      --task=longitudinal|mil|sequence|volume [--size=HxW] [--workers=N] [--duplicates=drop]

Writes ``DIR/<split>-NNNNN-of-MMMMM.array_record`` shards and ``DIR/manifest.json`` (schema
version, record counts and sha256 per shard, the preprocessing config, pixel normalisation
statistics of the training split). Files that cannot be read are listed in ``DIR/errors.csv``
(CSV line, ``file_ref``, reason) and skipped; the exit code is 0 when everything was ingested, 1
when some inputs failed (the summary says how many; when every input failed, errors.csv is
written but no manifest) and 2 for bad arguments or a bad CSV (nothing is written): a missing
``--images`` folder, an image path leaving it (absolute, ``..`` or a symlink to outside),
repeated rows (unless ``--duplicates=drop``), an unparsable cell. An empty split after the
patient split is a warning with the counts of every split.

Every shard is written under a temporary name and renamed when complete, with a small record of
its count, checksum, errors and pixel sums in ``DIR/.ingest/``. A rerun (after a crash, or with
more workers) skips finished shards and rewrites the rest; the output is byte-identical because
shard contents depend only on the CSV, the flags and the salt.

Privacy: records carry a salted SHA-256 of the patient id (the salt is ``--salt`` or a random one
kept in ``DIR/salt.txt``, never in the manifest) and only the task's fields; no DICOM header
field other than laterality / view is read. File names often carry the patient id, so errors.csv
and the log never show a path: they name the CSV line and ``file_ref``, the first 12 hex digits of
the salted SHA-256 of the path relative to ``--images`` (``reporting.file_ref`` recomputes it with
the salt), and every spelling of the path and every CSV identifier in a reason is replaced.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import flags

from mammojax.atomic_files import write_json_atomic
from mammojax.console import CommandLogFormatter, run_program
from mammojax.data.ingest import reporting, tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig

TASKS = ("longitudinal", "mil", "sequence", "volume")
ERRORS_FILE = "errors.csv"
STATE_DIR = ".ingest"
LOGGED_ERRORS = 10  # failed inputs named in the log (all are in errors.csv)
EXIT_OK, EXIT_FAILED_INPUTS, EXIT_BAD_INPUT = 0, 1, 2

_CSV = flags.DEFINE_string("csv", None, "Metadata CSV (one row per image / subject).")
_IMAGES = flags.DEFINE_string("images", None, "Root folder that image paths are relative to.")
_OUT = flags.DEFINE_string("out", None, "Output dataset folder.")
_TASK = flags.DEFINE_enum("task", "longitudinal", TASKS, "Which CSV kind / record layout.")
_SIZE = flags.DEFINE_string(
  "size", None, "Output size HxW (2-D; default 1024x832) or DxHxW (volume; default 96x96x96)."
)
_WORKERS = flags.DEFINE_integer("workers", 1, "Decoding processes (1 = in this process).")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 128, "Records per ArrayRecord shard.")
_SALT = flags.DEFINE_string(
  "salt",
  None,
  "Pseudonymisation salt; default: DIR/salt.txt, created with a random salt when absent.",
)
_SPLIT = flags.DEFINE_string(
  "split",
  "train=0.7,val=0.1,test=0.2",
  "Patient-level split fractions (used when the CSV has no split column).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Split seed.")
_DUPLICATES = flags.DEFINE_enum(
  "duplicates",
  "error",
  ["error", "drop"],
  "Repeated CSV rows (same patient, exam, laterality, view and image; same patient and image for "
  "mil / sequence; same subject for volume): 'error' refuses them naming both lines, 'drop' keeps "
  "the first of identical rows and counts the others.",
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
# Mammogram preprocessing.
_ORIENTATION = flags.DEFINE_enum(
  "orientation",
  "laterality",
  ["laterality", "auto", "none"],
  "How to make all breasts face the same way.",
)
_FLIP = flags.DEFINE_enum(
  "flip_laterality", "R", ["L", "R"], "Side mirrored under --orientation=laterality."
)
_CROP = flags.DEFINE_bool("crop", True, "Segment and crop the breast (removes burned-in labels).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.05, "Breast threshold, fraction of the range.")
_INTENSITY = flags.DEFINE_enum(
  "intensity",
  "minmax",
  ["minmax", "unit"],
  "minmax: stretch each image's range to 0..65535; unit: keep the absolute intensities of "
  "images already in [0, 1] (e.g. OASIS-style float NIfTI slices for Temporal-GradCam).",
)
# Longitudinal.
_NUM_YEARS = flags.DEFINE_integer("num_years", 5, "Risk horizon (years).")
_PRIOR = flags.DEFINE_enum("prior", "latest", ["latest", "all"], "Which priors to pair.")
_MIN_GAP = flags.DEFINE_float("min_gap_years", 0.0, "Minimum current-prior gap (years).")
_MISSING_PRIOR = flags.DEFINE_enum(
  "missing_prior",
  "keep",
  ["keep", "drop"],
  "Exams without an eligible prior: keep (has_prior 0) or drop.",
)
_KEEP = flags.DEFINE_list("keep_columns", [], "Extra CSV columns copied into records.")
# MIL / sequence / volume.
_LABELS = flags.DEFINE_list(
  "labels", ["Mass", "Suspicious_Calcification"], "MIL image-level label columns."
)
_MAX_LENGTH = flags.DEFINE_integer(
  "max_length", 0, "Sequence task: keep at most this many most recent images per patient (0 = all)."
)
_LABEL_SCOPE = flags.DEFINE_enum(
  "label_scope",
  "image",
  ["image", "patient"],
  "Sequence task: 'patient' refuses a label that changes within a patient (Temporal-GradCam's "
  "classes are the patient's); 'image' keeps each row's own label.",
)
_CONTRASTS = flags.DEFINE_list(
  "contrasts",
  [],
  "Volume task: contrast path columns (default: every column except subject, mask and split).",
)


STATE_FORMAT = 2  # version of the .ingest/ shard state files (2: errors carry file_ref)


class NoRecordsError(ValueError):
  """Nothing was ingested: every input failed (``failed > 0``; errors.csv is written) or the plan
  holds no work item. No manifest is written (an existing one is removed)."""

  def __init__(self, message: str, failed: int):
    super().__init__(message)
    self.failed = failed


@dataclasses.dataclass(frozen=True)
class Summary:
  """What one ingestion run did."""

  records: dict[str, int]
  failed: int
  shards_written: int
  shards_skipped: int
  errors: tuple[reporting.ReportedError, ...] = ()

  def line(self) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in self.records.items())
    return (
      f"ingested {sum(self.records.values())} records ({counts}); {self.failed} input(s) "
      f"failed (see {ERRORS_FILE}); {self.shards_written} shard(s) written, "
      f"{self.shards_skipped} already complete"
    )


def write_dataset(
  plan: tabular.IngestPlan,
  out_dir: str,
  *,
  fingerprint: str,
  records_per_shard: int = 128,
  workers: int = 1,
  progress: bool = False,
) -> Summary:
  """Builds and writes every record of ``plan``; resumes a partial run in ``out_dir``.

  Args:
    plan: from a task module's ``plan(...)``.
    out_dir: dataset folder.
    fingerprint: digest of everything the records depend on (inputs, flags, salt); a shard left
      by a run with another fingerprint is rewritten, never mixed in.
    records_per_shard: target records per shard (shards of a split differ by at most one item).
    workers: decoding processes; <= 1 decodes in this process.
    progress: show a tqdm bar on stderr.

  Raises:
    NoRecordsError: no record was written (errors.csv is, when inputs failed; no manifest).
  """
  # Imported here, not at the top: records pulls in jax, and spawned decoding workers import
  # this module; they start much faster without it.
  from mammojax.data import records

  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
  shards = []
  for split, items in plan.splits.items():
    count = math.ceil(len(items) / records_per_shard)
    for index, part in enumerate(records.split_evenly(items, count)):
      shards.append((split, records.shard_name(split, index, count), list(part)))
  pending = [s for s in shards if not _finished(out_dir, s[1], fingerprint)]
  _remove_stale_shards(out_dir, set(plan.splits), {name for _, name, _ in shards})

  total = sum(len(items) for _, _, items in pending)
  results = _build_all([item for _, _, items in pending for item in items], workers)
  from tqdm import tqdm

  with tqdm(total=total, disable=not progress, unit="rec", file=sys.stderr, desc="ingest") as bar:
    for _split, name, items in pending:
      state = {"errors": [], "sums": np.zeros(3, np.float64)}
      count, digest = records.write_shard(
        os.path.join(out_dir, name), _shard_records(items, results, state, plan, bar)
      )
      _write_json(
        _state_path(out_dir, name),
        {
          "format": STATE_FORMAT,
          "fingerprint": fingerprint,
          "count": count,
          "sha256": digest,
          "errors": [dataclasses.asdict(e) for e in state["errors"]],
          "pixel_sums": state["sums"].tolist(),
        },
      )
  if hasattr(results, "close"):
    results.close()

  splits, errors, sums = {}, [plan.redact(e) for e in plan.errors], {}
  for split, name, _ in shards:
    with open(_state_path(out_dir, name)) as f:
      state = json.load(f)
    entry = splits.setdefault(split, {"shards": [], "count": 0, "sha256": {}})
    entry["shards"].append(name)
    entry["count"] += state["count"]
    entry["sha256"][name] = state["sha256"]
    errors.extend(reporting.ReportedError(**e) for e in state["errors"])
    sums[split] = sums.get(split, np.zeros(3)) + np.asarray(state["pixel_sums"])
  for split in plan.splits:
    splits.setdefault(split, {"shards": [], "count": 0, "sha256": {}})
  reporting.write_errors(os.path.join(out_dir, ERRORS_FILE), errors)
  if not sum(entry["count"] for entry in splits.values()):
    _discard_empty_run(out_dir, [name for _, name, _ in shards])
    if errors:
      raise NoRecordsError(
        f"every input failed ({len(errors)} error(s), see {os.path.join(out_dir, ERRORS_FILE)}); "
        "no dataset written",
        failed=len(errors),
      )
    raise NoRecordsError(
      "the CSV yields no record (every row was dropped or filtered out); no dataset written",
      failed=0,
    )
  config = dict(plan.config, records_per_shard=records_per_shard, failed=len(errors))
  if plan.stat_fields:
    n, s, ss = sums.get("train", sum(sums.values(), np.zeros(3)))
    mean = s / n if n else 0.0
    config["pixel_mean"] = float(mean)
    config["pixel_std"] = float(math.sqrt(max(ss / n - mean * mean, 0.0))) if n else 1.0
    config["pixel_stats_fields"] = list(plan.stat_fields)
  records.write_manifest(out_dir, splits, config)
  return Summary(
    records={k: v["count"] for k, v in splits.items()},
    failed=len(errors),
    shards_written=len(pending),
    shards_skipped=len(shards) - len(pending),
    errors=tuple(errors),
  )


def _discard_empty_run(out_dir: str, names: list[str]) -> None:
  """Removes what an empty run leaves (empty shards, their state, an older manifest), so that
  no manifest describes an empty dataset and a rerun decodes every input again."""
  from mammojax.data import records

  for path in [os.path.join(out_dir, records.MANIFEST)] + [
    p for n in names for p in (os.path.join(out_dir, n), _state_path(out_dir, n))
  ]:
    if os.path.exists(path):
      os.remove(path)


def _build_all(items: list, workers: int) -> Iterator[tuple[str, Any]]:
  if workers <= 1 or len(items) <= 1:
    return map(tabular.run_item, items)
  # spawn: the parent has jax loaded, which must not be forked.
  pool = multiprocessing.get_context("spawn").Pool(min(workers, len(items)))
  return _PoolResults(pool, pool.imap(tabular.run_item, items, chunksize=1))


class _PoolResults:
  """Ordered results of a pool's imap that also shuts the pool down."""

  def __init__(self, pool, iterator):
    self.pool, self.iterator = pool, iterator

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)

  def close(self):
    self.pool.close()
    self.pool.join()


def _shard_records(
  items: list, results, state: dict, plan: tabular.IngestPlan, bar
) -> Iterator[dict[str, Any]]:
  for item in items:
    status, payload = next(results)
    bar.update(1)
    if status == "error":
      state["errors"].append(plan.redact(payload, item.files))
      continue
    for field in plan.stat_fields:
      pixels = payload[field]
      state["sums"] += (
        pixels.size,
        np.sum(pixels, dtype=np.float64),
        np.sum(np.square(pixels, dtype=np.float64)),
      )
    yield payload


def _remove_stale_shards(out_dir: str, splits: set[str], keep: set[str]) -> None:
  """Deletes shards of these splits left by a run with another shard count, and temporary
  files of an interrupted run."""
  pattern = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}\.array_record(?P<tmp>\.tmp-\d+)?$")
  for name in os.listdir(out_dir):
    match = pattern.match(name)
    if match and match["split"] in splits and (match["tmp"] or name not in keep):
      os.remove(os.path.join(out_dir, name))
      if os.path.exists(_state_path(out_dir, name)):
        os.remove(_state_path(out_dir, name))


def _finished(out_dir: str, name: str, fingerprint: str) -> bool:
  path = _state_path(out_dir, name)
  if not (os.path.exists(path) and os.path.exists(os.path.join(out_dir, name))):
    return False
  with open(path) as f:
    state = json.load(f)
  return state.get("format") == STATE_FORMAT and state.get("fingerprint") == fingerprint


def _state_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, STATE_DIR, f"{name}.json")


def _write_json(path: str, body: dict) -> None:
  write_json_atomic(path, body, sort_keys=True)


def _plan_from_flags(salt: str) -> tuple[tabular.IngestPlan, dict[str, Any]]:
  task, csv_path, root = _TASK.value, _CSV.value, _IMAGES.value
  fractions = tuple(tabular.parse_fractions(_SPLIT.value).items())
  if task == "volume":
    from mammojax.data.ingest import volume_csv

    options = volume_csv.VolumeOptions(
      size=tabular.parse_size(_SIZE.value, 3),
      contrasts=tuple(_CONTRASTS.value),
      fractions=fractions,
      seed=_SEED.value,
      duplicates=_DUPLICATES.value,
    )
    return volume_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)
  height, width = tabular.parse_size(_SIZE.value, 2)
  preprocess = MammoPreprocessConfig(
    height=height,
    width=width,
    orientation=_ORIENTATION.value,
    flip_laterality=_FLIP.value,
    crop=_CROP.value,
    threshold=_THRESHOLD.value,
    intensity=_INTENSITY.value,
  )
  if task == "longitudinal":
    from mammojax.data.ingest import longitudinal_csv

    options = longitudinal_csv.LongitudinalOptions(
      num_years=_NUM_YEARS.value,
      prior=_PRIOR.value,
      min_gap_years=_MIN_GAP.value,
      missing_prior=_MISSING_PRIOR.value,
      fractions=fractions,
      seed=_SEED.value,
      keep_columns=tuple(_KEEP.value),
      preprocess=preprocess,
      duplicates=_DUPLICATES.value,
    )
    return longitudinal_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)
  if task == "mil":
    from mammojax.data.ingest import mil_csv

    options = mil_csv.MilOptions(
      labels=tuple(_LABELS.value),
      fractions=fractions,
      seed=_SEED.value,
      preprocess=preprocess,
      duplicates=_DUPLICATES.value,
    )
    return mil_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)
  from mammojax.data.ingest import sequence_csv

  # Sequence images need not be mammograms: no crop / orientation / size change unless asked.
  default = sequence_csv.SequenceOptions().preprocess
  given = {n: flags.FLAGS[n].present for n in ("orientation", "crop", "size")}
  preprocess = dataclasses.replace(
    preprocess,
    orientation=preprocess.orientation if given["orientation"] else "none",
    crop=preprocess.crop if given["crop"] else False,
    height=height if given["size"] else default.height,
    width=width if given["size"] else default.width,
  )
  options = sequence_csv.SequenceOptions(
    max_length=_MAX_LENGTH.value,
    fractions=fractions,
    seed=_SEED.value,
    preprocess=preprocess,
    label_scope=_LABEL_SCOPE.value,
    # Without --size every image must have the default size: no silent resizing.
    expected_size=None if given["size"] else (default.height, default.width),
    duplicates=_DUPLICATES.value,
  )
  return sequence_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)


def main(argv: Sequence[str]) -> int:
  # Our own handler, not the root's (absl's, which prefixes every line with its own header).
  log = logging.getLogger("mammojax.ingest")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(CommandLogFormatter("%(message)s"))
  log.handlers[:] = [handler]
  log.setLevel(logging.INFO)
  log.propagate = False
  for name, flag in (("--csv", _CSV), ("--images", _IMAGES), ("--out", _OUT)):
    if not flag.value:
      log.error("%s is required", name)
      return EXIT_BAD_INPUT
  try:
    salt, new_salt = tabular.load_salt(_OUT.value, _SALT.value)
    plan, settings = _plan_from_flags(salt)
    fingerprint = tabular.fingerprint_inputs(
      _CSV.value, dict(settings, task=_TASK.value, records_per_shard=_PER_SHARD.value), salt
    )
  except (ValueError, OSError, csv.Error) as e:  # a bad CSV or flag: one line, no traceback
    log.error("ingest: %s", e)
    return EXIT_BAD_INPUT
  if not any(plan.splits.values()) and not plan.errors:
    log.error("ingest: the CSV yields no record (every row was dropped or filtered out)")
    return EXIT_BAD_INPUT
  if new_salt:
    tabular.store_salt(_OUT.value, salt)
  if plan.config.get("duplicates_dropped"):
    log.warning(
      "ingest: dropped %d duplicated row(s) (--duplicates=drop)", plan.config["duplicates_dropped"]
    )
  try:
    summary = write_dataset(
      plan,
      _OUT.value,
      fingerprint=fingerprint,
      records_per_shard=_PER_SHARD.value,
      workers=_WORKERS.value,
      progress=_PROGRESS.value,
    )
  except NoRecordsError as e:
    log.error("ingest: %s", e)
    return EXIT_FAILED_INPUTS if e.failed else EXIT_BAD_INPUT
  except OSError as e:  # the output folder cannot be written
    log.error("ingest: cannot write the dataset to %s: %s", _OUT.value, e)
    return EXIT_BAD_INPUT
  for error in summary.errors[:LOGGED_ERRORS]:  # by CSV line and file_ref, never a path
    log.warning("ingest: failed: %s", error.line())
  if len(summary.errors) > LOGGED_ERRORS:
    log.warning("ingest: ... %d more in %s", len(summary.errors) - LOGGED_ERRORS, ERRORS_FILE)
  warning = reporting.empty_split_warning(summary.records, plan.splits)
  if warning:
    log.warning("ingest: warning: %s", warning)
  log.info("%s; output in %s", summary.line(), _OUT.value)
  return EXIT_FAILED_INPUTS if summary.failed else EXIT_OK


if __name__ == "__main__":
  run_program(main)
