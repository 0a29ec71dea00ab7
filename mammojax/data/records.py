"""Record codec and atomic ArrayRecord shard writing.

Every dataset in mammojax, synthetic or ingested from real files, is a directory of ArrayRecord
shards plus a ``manifest.json``. One record is one example: a flat ``dict`` of numpy arrays and
scalars, encoded with msgpack (numpy arrays keep dtype and shape).

Shards are written to a temporary name and renamed when complete, so a crash never leaves a
half-written shard under its final name, and a rerun can skip the shards that already exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module
from flax import serialization

from mammojax.atomic_files import atomic_path, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

Example = dict[str, Any]


def encode_example(example: Mapping[str, Any]) -> bytes:
  """Serialises one example (a flat dict of numpy arrays / scalars / strings) to bytes."""
  clean = {}
  for key, value in example.items():
    if isinstance(value, (np.ndarray, np.generic)):
      clean[key] = np.asarray(value)
    elif isinstance(value, (bool, int, float, str, bytes)):
      clean[key] = value
    else:
      raise TypeError(
        f"record field {key!r} has unsupported type {type(value).__name__}; "
        "use numpy arrays, numbers or strings"
      )
  return serialization.msgpack_serialize(clean)


def decode_example(data: bytes) -> Example:
  """Inverse of :func:`encode_example`."""
  return dict(serialization.msgpack_restore(data))


def shard_name(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: str, examples: Iterable[Mapping[str, Any]]) -> tuple[int, str]:
  """Writes one ArrayRecord shard atomically. Returns (number of records, sha256 of the file)."""
  with atomic_path(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    try:
      for example in examples:
        writer.write(encode_example(example))
        count += 1
    finally:
      writer.close()
    digest = file_sha256(tmp)
  return count, digest


def shard_paths(directory: str, split: str) -> list[str]:
  """The shard files of one split, as listed in the directory's manifest."""
  manifest = read_manifest(directory)
  if split not in manifest["splits"]:
    raise KeyError(
      f"{directory}/{MANIFEST} has no split {split!r}; it has {sorted(manifest['splits'])}"
    )
  return [os.path.join(directory, s) for s in manifest["splits"][split]["shards"]]


def write_manifest(
  directory: str, splits: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]
) -> None:
  """Writes ``manifest.json`` atomically (the dataset counts as complete once it exists)."""
  body = {"schema_version": SCHEMA_VERSION, "splits": dict(splits), "config": dict(config)}
  write_json_atomic(
    os.path.join(directory, MANIFEST), body, indent=2, sort_keys=True, default=_json_default
  )


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: {directory!r} is not a finished mammojax "
      "dataset (write it with mammojax.ingest or the synthetic generator)"
    )
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(
      f"{path}: schema_version {manifest.get('schema_version')} is not "
      f"{SCHEMA_VERSION}; re-create the dataset with this mammojax version"
    )
  return manifest


def split_evenly(items: Sequence[Any], count: int) -> list[Sequence[Any]]:
  """Splits a sequence into ``count`` contiguous parts whose sizes differ by at most one."""
  bounds = np.linspace(0, len(items), count + 1).round().astype(int)
  return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def file_sha256(path: str) -> str:
  """The SHA-256 hex digest of a file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, (tuple, set)):
    return list(value)
  return str(value)
