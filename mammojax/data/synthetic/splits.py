"""What every embedded synthetic dataset shares: train/val/test splits of a seeded generator,
a fingerprint of its settings, and writing it once as ArrayRecord shards + manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from mammojax.data import records
from mammojax.data.constants import SPLITS


class SplitCounts:
  """Mixin for frozen dataclass specs with ``num_train``, ``num_val``, ``num_test``."""

  def count(self, split: str) -> int:
    return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

  def fingerprint(self) -> str:
    body = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


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
  sample = np.concatenate(pixels).astype(np.float64) if pixels else np.zeros(1)
  config = dict(
    dataclasses.asdict(spec),
    kind=kind,
    **manifest_config,
    pixel_mean=float(sample.mean()),
    pixel_std=float(sample.std() + 1e-6),
  )
  records.write_manifest(out, splits, config)
  return out
