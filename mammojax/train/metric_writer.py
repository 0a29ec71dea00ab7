"""Metrics on process 0: one JSON object per logged step in ``metrics.jsonl`` (readable by
pandas/notebooks) and TensorBoard event files via tensorboardX (no TensorFlow needed).

A resumed run continues the history of the step it restored: rows of ``metrics.jsonl`` past
that step (logged by the job that was killed before its next checkpoint) are dropped before
new ones are written, by rewriting the file under a temporary name and renaming it. TensorBoard
gets the same through its own restart rule: the new event file starts with a
``SessionLog.START`` event at the first step of the new segment (tensorboardX's
``purge_step``), and TensorBoard's event reader discards every event of the earlier files
whose step is at least that one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping

import jax

from mammojax.atomic_files import atomic_write

log = logging.getLogger("mammojax")


class MetricWriter:
  """Appends ``{"step": s, "train/loss": ...}`` lines and TensorBoard scalars.

  Only process 0 writes; other processes hold a writer that does nothing, so callers need no
  ``if process_index == 0`` of their own.

  Args:
    workdir: the run's directory.
    tensorboard: also write TensorBoard events under ``workdir/tensorboard``.
    start_step: the step the run (re)starts from: earlier history after it is dropped, and
      ``history`` holds the rows kept (process 0 only).
  """

  def __init__(self, workdir: str, tensorboard: bool = True, start_step: int = 0):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self.history: list[dict] = []
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.history = drop_rows_after(self.path, start_step)
    self._jsonl = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter

      # A START event at start_step + 1: TensorBoard hides older events from that step on. The
      # suffix keeps two files opened in the same second apart (tensorboardX names them by the
      # second and the host, and would truncate the first) and in the order they were opened.
      self._tb = SummaryWriter(
        os.path.join(workdir, "tensorboard"),
        purge_step=start_step + 1,
        filename_suffix=f".{time.time_ns()}",
      )

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


def drop_rows_after(path: str, step: int) -> list[dict]:
  """Removes the rows of the metrics file ``path`` whose step is past ``step`` (and a last line
  cut off by a kill), atomically; returns the rows kept. A missing file is an empty history."""
  if not os.path.exists(path):
    return []
  kept, dropped, garbled = [], 0, 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        garbled += 1
        continue
      if row.get("step", 0) > step:
        dropped += 1
      else:
        kept.append(row)
  if dropped or garbled:
    with atomic_write(path) as f:
      f.writelines(json.dumps(row) + "\n" for row in kept)
    log.info(
      "%s: dropped %d rows logged after step %d (the restored checkpoint)%s",
      path,
      dropped,
      step,
      f" and {garbled} unreadable lines" if garbled else "",
    )
  return kept


def read_metrics(workdir: str) -> list[dict]:
  """All rows of ``workdir/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
