"""What every embedded synthetic dataset shares: train/val/test splits of a seeded generator,
a fingerprint of its settings, and writing it once as ArrayRecord shards + manifest.

:func:`write_splits` generates ``count(split)`` examples per split one at a time;
:func:`write_example_splits` writes examples built all at once, for generators whose records
are not independent of each other (several records per generated patient)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mammojax.data import records
from mammojax.data.constants import SPLITS


class Fingerprinted:
  """Mixin for frozen dataclass specs: a short digest of every field names the dataset."""

  def fingerprint(self) -> str:
    body = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


class SplitCounts(Fingerprinted):
  """Mixin for frozen dataclass specs with ``num_train``, ``num_val``, ``num_test``."""

  def count(self, split: str) -> int:
    return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


def write_splits(
  directory: str,
  kind: str,
  spec: Any,
  generate: Callable[[Any, str, int], dict],
  image_key: str,
  **manifest_config: Any,
) -> str:
  """Writes every split of ``generate(spec, split, index)`` under ``directory/<kind>_<fp>``.

  A finished dataset with the same spec is reused. The manifest records the spec and the mean
  and standard deviation of ``image_key`` pixels over (a sample of) the training split.
  Returns the dataset directory.
  """
  out = os.path.join(directory, f"{kind}_{spec.fingerprint()}")
  if os.path.exists(os.path.join(out, records.MANIFEST)):
    return out
  os.makedirs(out, exist_ok=True)
  splits, pixels = {}, []
  for split in SPLITS:
    count = spec.count(split)
    num_shards = max(1, -(-count // spec.examples_per_shard))
    names = []
    for shard, indices in enumerate(records.split_evenly(range(count), num_shards)):
      name = records.shard_name(split, shard, num_shards)
      examples = [generate(spec, split, int(i)) for i in indices]
      if split == "train":
        pixels.extend(e[image_key][::4, ::4].ravel() for e in examples[:64])
      records.write_shard(os.path.join(out, name), examples)
      names.append(name)
    splits[split] = {"shards": names, "count": count}
  _write_manifest(out, splits, spec, kind, pixels, manifest_config)
  return out


def write_example_splits(
  directory: str,
  kind: str,
  spec: Any,
  build: Callable[[], Mapping[str, Sequence[dict]]],
  pixel_sample: Callable[[dict], np.ndarray],
  **manifest_config: Any,
) -> str:
  """Writes ``build()`` (split name -> its records, in order) under ``directory/<kind>_<fp>``.

  Like :func:`write_splits`, but the splits are whatever ``build`` returns and it is called
  only when no finished dataset with the same spec exists. The pixel statistics in the manifest
  come from ``pixel_sample(record)`` over the ``"train"`` records (or all records without one).
  Returns the dataset directory.
  """
  out = os.path.join(directory, f"{kind}_{spec.fingerprint()}")
  if os.path.exists(os.path.join(out, records.MANIFEST)):
    return out
  os.makedirs(out, exist_ok=True)
  built = build()
  splits = {}
  for split, examples in built.items():
    num_shards = max(1, -(-len(examples) // spec.examples_per_shard))
    names = []
    for shard, part in enumerate(records.split_evenly(list(examples), num_shards)):
      name = records.shard_name(split, shard, num_shards)
      records.write_shard(os.path.join(out, name), part)
      names.append(name)
    splits[split] = {"shards": names, "count": len(examples)}
  sampled = built["train"] if "train" in built else [e for v in built.values() for e in v]
  pixels = [np.asarray(pixel_sample(e)).ravel() for e in sampled]
  _write_manifest(out, splits, spec, kind, pixels, manifest_config)
  return out


def _write_manifest(
  out: str,
  splits: Mapping[str, Any],
  spec: Any,
  kind: str,
  pixels: list[np.ndarray],
  manifest_config: Mapping[str, Any],
) -> None:
  """The manifest: the spec, ``kind``, extra settings and the sampled pixels' mean and std."""
  sample = np.concatenate(pixels).astype(np.float64) if pixels else np.zeros(1)
  config = dict(
    dataclasses.asdict(spec),
    kind=kind,
    **manifest_config,
    pixel_mean=float(sample.mean()),
    pixel_std=float(sample.std() + 1e-6),
  )
  records.write_manifest(out, splits, config)
