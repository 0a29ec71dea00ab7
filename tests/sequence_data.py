"""Small padded sequences for the temporal model and attribution tests."""

from __future__ import annotations

import numpy as np


def padded_sequences(
  lengths: np.ndarray, length: int, dim: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """End-padded features ``[B, L, D]``, mask and time offsets ``[B, L]`` (the reference's
  layout): ``lengths[b]`` real visits, oldest first, the current one (offset 0) last."""
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  features = np.zeros((batch, length, dim), np.float32)
  offsets = np.zeros((batch, length), np.float32)
  mask = np.arange(length)[None] < np.asarray(lengths)[:, None]
  for b, n in enumerate(lengths):
    features[b, :n] = rng.normal(size=(n, dim))
    offsets[b, : n - 1] = np.sort(rng.uniform(0.2, 4.0, size=n - 1))[::-1]
  return features, mask, offsets


def to_start_padding(array: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Moves each row's real prefix to the end (newest visit last)."""
  out = np.zeros_like(array)
  for b, n in enumerate(lengths):
    out[b, array.shape[1] - n :] = array[b, :n]
  return out
