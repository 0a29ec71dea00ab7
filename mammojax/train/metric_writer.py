"""Metrics on process 0: one JSON object per logged step in ``metrics.jsonl`` (readable by
pandas/notebooks) and TensorBoard event files via tensorboardX (no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax


class MetricWriter:
  """Appends ``{"step": s, "train/loss": ...}`` lines and TensorBoard scalars.

  Only process 0 writes; other processes hold a writer that does nothing, so callers need no
  ``if process_index == 0`` of their own.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step)}
    for key, value in metrics.items():
      value = float(value)
      row[key] = value if math.isfinite(value) else None  # JSON has no NaN.
      if self._tb is not None and math.isfinite(value):
        self._tb.add_scalar(key, value, int(step))
    self._jsonl.write(json.dumps(row) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All rows of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
