"""Grain pipelines the trainer reads: shuffled, repeated, per-host train batches with a
checkpointable iterator, and padded evaluation batches that every host steps through in lockstep.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

VALID_KEY = "_valid"


class KeepNumeric(grain.transforms.Map):
  """Drops non-numeric fields (ids kept as strings) and marks the example as real (not padding)."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in example.items() if _is_numeric(v)}
    out[VALID_KEY] = np.int32(1)
    return out


def train_iterator(
  examples: grain.MapDataset,
  *,
  seed: int,
  global_batch_size: int,
  process_index: int,
  process_count: int,
  workers: int = 0,
  read_threads: int = 4,
  augmentations: Sequence[grain.transforms.Map | grain.transforms.RandomMap] = (),
) -> grain.DatasetIterator:
  """An endless iterator of this host's part of each global batch.

  ``augmentations`` run after the shuffle and repeat; a ``RandomMap`` gets a generator seeded
  by ``seed`` and the example's position in the endless stream, so it differs every epoch and
  is reproduced exactly on resume.

  The examples are shuffled (a new order every epoch) and cut into local batches; host ``i``
  takes the ``i``-th of every ``process_count`` consecutive ones, i.e. a contiguous block of each
  global batch. So every row of the global batch, and hence the loss (dropout masks included),
  is the same whatever the number of hosts. Its ``get_state``/``set_state`` is what the
  checkpoint stores.
  """
  local_batch = _local_batch(global_batch_size, process_count)
  ds = examples.seed(seed).shuffle().repeat()
  for transform in augmentations:
    ds = (
      ds.random_map(transform)
      if isinstance(transform, grain.transforms.RandomMap)
      else ds.map(transform)
    )
  ds = ds.map(KeepNumeric())
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
  )
  if workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(iter_ds)


def eval_batches(
  examples: grain.MapDataset, *, global_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
  """This host's part of every evaluation batch, in order, padded so all hosts yield the same
  number of batches; padded rows repeat a real example and carry ``_valid == 0``."""
  local_batch = _local_batch(global_batch_size, process_count)
  total = len(examples)
  if total == 0:
    raise ValueError("the evaluation split is empty")
  num_batches = -(-total // global_batch_size)
  mine = examples[process_index::process_count]
  filler = KeepNumeric().map(examples[0])
  filler[VALID_KEY] = np.int32(0)
  for b in range(num_batches):
    rows = []
    for i in range(b * local_batch, (b + 1) * local_batch):
      rows.append(KeepNumeric().map(mine[i]) if i < len(mine) else filler)
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
      f"train.batch_size {global_batch_size} is not divisible by the {process_count} processes"
    )
  return global_batch_size // process_count


def _is_numeric(value: Any) -> bool:
  return np.asarray(value).dtype.kind in "biuf"
