"""Running a task's predict step over a whole split and aggregating on the host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from mammojax.data.pipelines import batching
from mammojax.train.task import Task


def to_global(batch: dict[str, np.ndarray], batch_sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each host's part of a batch into global arrays laid out by ``batch_sharding``."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
    for k, v in batch.items()
  }


def collect_predictions(
  predict_fn: Callable[[Any, dict], dict],
  state: Any,
  examples: grain.MapDataset,
  global_batch_size: int,
  batch_sharding: NamedSharding,
) -> dict[str, np.ndarray]:
  """All per-example outputs of ``predict_fn`` over ``examples``, padding removed, on every host."""
  chunks: dict[str, list[np.ndarray]] = {}
  for local in batching.eval_batches(
    examples,
    global_batch_size=global_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    outputs = predict_fn(state, to_global(local, batch_sharding))
    if jax.process_count() > 1:
      outputs = multihost_utils.process_allgather(outputs, tiled=True)
    for key, value in outputs.items():
      chunks.setdefault(key, []).append(np.asarray(value))
  merged = {k: np.concatenate(v) for k, v in chunks.items()}
  valid = merged.pop(batching.VALID_KEY).astype(bool)
  return {k: v[valid] for k, v in merged.items()}


def evaluate_split(
  task: Task,
  predict_fn: Callable,
  state: Any,
  split: str,
  global_batch_size: int,
  batch_sharding: NamedSharding,
) -> dict[str, float]:
  predictions = collect_predictions(
    predict_fn, state, task.dataset(split), global_batch_size, batch_sharding
  )
  return task.evaluate(predictions)
