r"""Ingest real images + CSV metadata into mammojax ArrayRecord shards.

  python -m mammojax.ingest --csv=META.csv --images=ROOT --out=DIR \
      --task=longitudinal|mil|sequence|volume [--size=HxW] [--workers=N]

Writes ``DIR/<split>-NNNNN-of-MMMMM.array_record`` shards and ``DIR/manifest.json`` (schema
version, record counts and sha256 per shard, the preprocessing config, pixel normalisation
statistics of the training split). Files that cannot be read are listed in ``DIR/errors.csv``
(CSV line, file, reason) and skipped; the exit code is 0 when everything was ingested, 1 when
some inputs failed (the summary says how many) and 2 for bad arguments or a bad CSV (nothing is
written).

Every shard is written under a temporary name and renamed when complete, with a small record of
its count, checksum, errors and pixel sums in ``DIR/.ingest/``. A rerun (after a crash, or with
more workers) skips finished shards and rewrites the rest; the output is byte-identical because
shard contents depend only on the CSV, the flags and the salt.

Privacy: records carry a salted SHA-256 of the patient id (the salt is ``--salt`` or a random one
kept in ``DIR/salt.txt``, never in the manifest) and only the task's fields; no DICOM header
field other than laterality / view is read, and logs name CSV lines and files only.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
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

from mammojax.atomic_files import atomic_write, write_json_atomic
from mammojax.console import run_program
from mammojax.data.ingest import tabular
from mammojax.data.ingest.mammo_preprocess import MammoPreprocessConfig

TASKS = ("longitudinal", "mil", "sequence", "volume")
ERRORS_FILE = "errors.csv"
STATE_DIR = ".ingest"
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


@dataclasses.dataclass(frozen=True)
class Summary:
  """What one ingestion run did."""

  records: dict[str, int]
  failed: int
  shards_written: int
  shards_skipped: int

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
        os.path.join(out_dir, name), _shard_records(items, results, state, plan.stat_fields, bar)
      )
      _write_json(
        _state_path(out_dir, name),
        {
          "fingerprint": fingerprint,
          "count": count,
          "sha256": digest,
          "errors": [dataclasses.asdict(e) for e in state["errors"]],
          "pixel_sums": state["sums"].tolist(),
        },
      )
  if hasattr(results, "close"):
    results.close()

  splits, errors, sums = {}, list(plan.errors), {}
  for split, name, _ in shards:
    with open(_state_path(out_dir, name)) as f:
      state = json.load(f)
    entry = splits.setdefault(split, {"shards": [], "count": 0, "sha256": {}})
    entry["shards"].append(name)
    entry["count"] += state["count"]
    entry["sha256"][name] = state["sha256"]
    errors.extend(tabular.ErrorRow(**e) for e in state["errors"])
    sums[split] = sums.get(split, np.zeros(3)) + np.asarray(state["pixel_sums"])
  for split in plan.splits:
    splits.setdefault(split, {"shards": [], "count": 0, "sha256": {}})
  config = dict(plan.config, records_per_shard=records_per_shard, failed=len(errors))
  if plan.stat_fields:
    n, s, ss = sums.get("train", sum(sums.values(), np.zeros(3)))
    mean = s / n if n else 0.0
    config["pixel_mean"] = float(mean)
    config["pixel_std"] = float(math.sqrt(max(ss / n - mean * mean, 0.0))) if n else 1.0
    config["pixel_stats_fields"] = list(plan.stat_fields)
  _write_errors(out_dir, errors)
  records.write_manifest(out_dir, splits, config)
  return Summary(
    records={k: v["count"] for k, v in splits.items()},
    failed=len(errors),
    shards_written=len(pending),
    shards_skipped=len(shards) - len(pending),
  )


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
  items: list, results, state: dict, stat_fields: Sequence[str], bar
) -> Iterator[dict[str, Any]]:
  for _ in items:
    status, payload = next(results)
    bar.update(1)
    if status == "error":
      state["errors"].append(payload)
      continue
    for field in stat_fields:
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
    return json.load(f).get("fingerprint") == fingerprint


def _state_path(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, STATE_DIR, f"{name}.json")


def _write_json(path: str, body: dict) -> None:
  write_json_atomic(path, body, sort_keys=True)


def _write_errors(out_dir: str, errors: list[tabular.ErrorRow]) -> None:
  with atomic_write(os.path.join(out_dir, ERRORS_FILE), newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["rows", "file", "reason"])
    for e in errors:
      writer.writerow([e.rows, e.file, e.reason])


def _plan_from_flags(salt: str) -> tuple[tabular.IngestPlan, dict[str, Any]]:
  task, csv_path, root = _TASK.value, _CSV.value, _IMAGES.value
  fractions = tuple(tabular.parse_fractions(_SPLIT.value).items())
  if task == "volume":
    from mammojax.data.ingest import volume_csv

    options = volume_csv.VolumeOptions(
      size=parse_size(_SIZE.value, 3),
      contrasts=tuple(_CONTRASTS.value),
      fractions=fractions,
      seed=_SEED.value,
    )
    return volume_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)
  height, width = parse_size(_SIZE.value, 2)
  preprocess = MammoPreprocessConfig(
    height=height,
    width=width,
    orientation=_ORIENTATION.value,
    flip_laterality=_FLIP.value,
    crop=_CROP.value,
    threshold=_THRESHOLD.value,
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
    )
    return longitudinal_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)
  if task == "mil":
    from mammojax.data.ingest import mil_csv

    options = mil_csv.MilOptions(
      labels=tuple(_LABELS.value), fractions=fractions, seed=_SEED.value, preprocess=preprocess
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
  )
  return sequence_csv.plan(csv_path, root, options, salt), dataclasses.asdict(options)


def main(argv: Sequence[str]) -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  log = logging.getLogger("mammojax.ingest")
  for name, flag in (("--csv", _CSV), ("--images", _IMAGES), ("--out", _OUT)):
    if not flag.value:
      log.error("%s is required", name)
      return EXIT_BAD_INPUT
  try:
    salt, new_salt = tabular.load_salt(_OUT.value, _SALT.value)
    plan, settings = _plan_from_flags(salt)
    fingerprint = fingerprint_inputs(
      _CSV.value, dict(settings, task=_TASK.value, records_per_shard=_PER_SHARD.value), salt
    )
  except (ValueError, FileNotFoundError) as e:
    log.error("ingest: %s", e)
    return EXIT_BAD_INPUT
  if new_salt:
    tabular.store_salt(_OUT.value, salt)
  summary = write_dataset(
    plan,
    _OUT.value,
    fingerprint=fingerprint,
    records_per_shard=_PER_SHARD.value,
    workers=_WORKERS.value,
    progress=_PROGRESS.value,
  )
  log.info("%s; output in %s", summary.line(), _OUT.value)
  return EXIT_FAILED_INPUTS if summary.failed else EXIT_OK


if __name__ == "__main__":
  run_program(main)
