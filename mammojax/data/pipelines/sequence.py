"""Sequence records (``mammojax.ingest --task=sequence``, the synthetic brain set, or per-image
feature records) as fixed-length examples for the temporal models.

A record holds one image and the same patient's earlier images, oldest first (``T`` of them).
Batches need one shape: :class:`PadSequence` keeps the newest ``max_length`` images and pads
the rest with zeros, either before the images (``padding="start"``: the newest image always sits
at index ``max_length - 1``, the Temporal-GradCam README's intent) or after them
(``padding="end"``: images first, zeros after, as the reference code's ``collate_fn`` does). A
``sequence_mask`` marks the real images.

Splits: :func:`sequence_dataset` reads a stored split, or, with ``resplit_seed``, a new
patient-level split drawn by :func:`patient_splits` over all stored records (stratified by the
patient's label; every record of a patient lands in the same split).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mammojax.data import records
from mammojax.data.ingest.tabular import stratified_patient_split

# Per-image record fields ([T, ...]) that are padded when present.
PER_IMAGE_FIELDS = ("images", "features", "time_offsets", "image_labels", "region_masks")
PADDINGS = ("start", "end")
DEFAULT_FRACTIONS = (("train", 0.6), ("val", 0.2), ("test", 0.2))

_DTYPES = {
  "images": np.float32,
  "features": np.float32,
  "time_offsets": np.float32,
  "image_labels": np.int32,
  "region_masks": np.uint8,
}


class PadSequence(grain.transforms.Map):
  """A sequence record -> a fixed-length example of ``L = max_length`` images.

  Output (each per-image field only when the record has it): ``images`` float32 [L, H, W, 1]
  normalised with ``(x - pixel_mean) / pixel_std``; ``features`` float32 [L, D];
  ``time_offsets`` float32 [L]; ``image_labels`` int32 [L]; ``region_masks`` uint8 [L, H, W];
  always ``sequence_mask`` int32 [L] (1 = real image), ``label`` int32 and ``length`` int32
  (the number of images kept). Padding positions are zero in every field. Longer sequences keep
  their newest ``max_length`` images, in their stored order.
  """

  def __init__(self, max_length: int, pixel_mean: float, pixel_std: float, padding: str = "start"):
    if max_length < 1:
      raise ValueError(
        f"max_length must be >= 1, got {max_length}: data.seq_len must be >= 1 (the number of "
        "newest images per example)"
      )
    if padding not in PADDINGS:
      raise ValueError(
        f"padding (data.padding) must be 'start' (zeros before the images, newest last) or "
        f"'end' (images first, zeros after), got {padding!r}"
      )
    self.max_length = int(max_length)
    self.pixel_mean = float(pixel_mean)
    self.pixel_std = float(pixel_std)
    self.padding = padding

  def map(self, data: bytes | dict[str, Any]) -> dict[str, Any]:
    """``data``: an encoded record (bytes) or an already decoded one."""
    record = records.decode_example(data) if isinstance(data, bytes) else data
    length = int(record["length"])
    keep = min(length, self.max_length)
    pad = self.max_length - keep
    before, after = (pad, 0) if self.padding == "start" else (0, pad)
    out: dict[str, Any] = {}
    for key in PER_IMAGE_FIELDS:
      if key not in record:
        continue
      values = np.asarray(record[key])[length - keep : length]
      if key == "images":
        values = (values.astype(np.float32) - self.pixel_mean) / self.pixel_std
        values = values[..., None]
      values = values.astype(_DTYPES[key])
      out[key] = np.pad(values, [(before, after)] + [(0, 0)] * (values.ndim - 1))
    out["sequence_mask"] = np.pad(np.ones(keep, np.int32), (before, after))
    out["label"] = np.int32(record["label"])
    out["length"] = np.int32(keep)
    return out


def patient_splits(
  directory: str, fractions: Sequence[tuple[str, float]], seed: int
) -> dict[str, list[tuple[str, int]]]:
  """A new patient-level split of every record stored in ``directory``.

  Pools the records of all stored splits, groups them by ``patient_hash`` and assigns each
  patient to one split, stratified by the patient's label (the largest label among its
  records, as the ingester stratifies).

  Args:
    directory: a finished sequence dataset.
    fractions: (split name, fraction of patients) pairs, summing to 1.
    seed: the permutation seed; the result depends only on it and the stored records.

  Returns:
    Split name -> its records as (stored split, index within that split), in stored order.
  """
  names = [name for name, _ in fractions]
  if len(set(names)) != len(names) or any(f < 0 for _, f in fractions):
    raise ValueError(f"fractions {fractions!r} need distinct split names and fractions >= 0")
  if abs(sum(f for _, f in fractions) - 1.0) > 1e-6:
    raise ValueError(f"fractions {fractions!r} must sum to 1")
  keys = _patient_keys(directory, _manifest_stamp(directory))
  outcomes: dict[str, int] = {}
  for patient, label in keys.values():
    outcomes[patient] = max(label, outcomes.get(patient, label))
  assignment = stratified_patient_split(outcomes, dict(fractions), seed)
  out: dict[str, list[tuple[str, int]]] = {name: [] for name in names}
  for where, (patient, _) in keys.items():
    out[assignment[patient]].append(where)
  return out


def sequence_dataset(
  directory: str,
  split: str,
  max_length: int,
  *,
  padding: str = "start",
  resplit_seed: int | None = None,
  fractions: Sequence[tuple[str, float]] = DEFAULT_FRACTIONS,
  normalisation: tuple[float, float] | None = None,
) -> grain.MapDataset:
  """The padded examples (:class:`PadSequence`) of one split of a sequence dataset.

  Args:
    directory: a finished dataset (ingested, synthetic, or per-image features).
    split: the split to read.
    max_length: ``L``, the number of images per example (newest kept).
    padding: "start" or "end" (see :class:`PadSequence`).
    resplit_seed: None reads the stored split; a seed draws a new patient-level split with
      :func:`patient_splits` over all stored records.
    fractions: the split fractions used with ``resplit_seed``.
    normalisation: (mean, std) for the images; None uses the manifest's ``pixel_mean`` and
      ``pixel_std`` (0 and 1 when it has none, as feature datasets).
  """
  manifest = records.read_manifest(directory)
  config = manifest["config"]
  if normalisation is None:
    normalisation = (config.get("pixel_mean", 0.0), config.get("pixel_std", 1.0))
  transform = PadSequence(max_length, *normalisation, padding=padding)
  stored = sorted(manifest["splits"])
  if resplit_seed is None:
    if split not in manifest["splits"]:
      raise ValueError(
        f"{directory} has no stored split {split!r} (it has {stored}): re-ingest with "
        f"--fractions including {split}, or set data.split_seed >= 0 to draw a new "
        "patient-level split over all records"
      )
    source = _SplitRecords(directory, [split], None)
  else:
    chosen = patient_splits(directory, fractions, resplit_seed)
    if split not in chosen:
      raise ValueError(
        f"split {split!r} is not among the resplit fractions {[n for n, _ in fractions]}"
      )
    source = _SplitRecords(directory, stored, chosen[split])
  return grain.MapDataset.source(source).map(transform)


def manifest_config(directory: str) -> dict[str, Any]:
  """The ``config`` section of a dataset's manifest (task, kind, pixel statistics, ...)."""
  return records.read_manifest(directory)["config"]


class _SplitRecords:
  """Random access to chosen records of a dataset: every record of ``splits`` in order, or the
  listed (stored split, index) pairs. Opens one ArrayRecord source per stored split, lazily
  (picklable for Grain worker processes)."""

  def __init__(
    self, directory: str, splits: Sequence[str], pairs: Sequence[tuple[str, int]] | None
  ):
    self._paths = {s: records.shard_paths(directory, s) for s in splits}
    self._sources: dict[str, Any] = {}
    if pairs is None:
      pairs = [(s, i) for s in splits for i in range(len(self._source(s)))]
    self._pairs = list(pairs)

  def _source(self, split: str) -> Any:
    if split not in self._sources:
      paths = self._paths[split]
      self._sources[split] = grain.sources.ArrayRecordDataSource(paths) if paths else []
    return self._sources[split]

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> bytes:
    split, position = self._pairs[index]
    return self._source(split)[position]

  def __getstate__(self) -> dict[str, Any]:
    return {"_paths": self._paths, "_pairs": self._pairs, "_sources": {}}


def _manifest_stamp(directory: str) -> tuple[str, int]:
  path = os.path.join(os.path.abspath(directory), records.MANIFEST)
  return path, os.stat(path).st_mtime_ns


@functools.lru_cache(maxsize=8)
def _patient_keys(directory: str, stamp: tuple[str, int]) -> dict[tuple[str, int], tuple[str, int]]:
  """(stored split, index) -> (patient_hash, label) for every record; cached per manifest
  version (``stamp``) so the splits of one resplit read the records once."""
  del stamp
  manifest = records.read_manifest(directory)
  keys = {}
  for split in sorted(manifest["splits"]):
    source = _SplitRecords(directory, [split], None)
    for index in range(len(source)):
      record = records.decode_example(source[index])
      if "patient_hash" not in record:
        raise ValueError(
          f"{directory}: record {index} of split {split!r} has no patient_hash; a patient-level "
          "resplit needs it (re-create the dataset with this mammojax version)"
        )
      keys[(split, index)] = (str(record["patient_hash"]), int(record["label"]))
  return keys
