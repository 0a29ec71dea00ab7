"""Continuous time-gap encoding: a sinusoidal table over [0, max_time], read by interpolation.

As in BCRBench's ImgFeatAlign: the table has ``num_steps`` rows at evenly spaced times from 0 to
``max_time`` (both included; defaults 240 rows over 5 years, one row per ~0.25 month); row ``r``
holds ``sin(t_r * w_k)`` in even and ``cos(t_r * w_k)`` in odd channels with
``w_k = 10000^(-2k / dim)``. A gap is clipped to [0, max_time] and the two neighbouring rows are
mixed linearly. The same vector is added to every token of an example, then dropout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def sinusoid_table(dim: int, max_time: float, num_steps: int) -> np.ndarray:
  """``[num_steps, dim]`` float32 table (computed in float32, as the torch buffer is)."""
  if dim % 2:
    raise ValueError(f"time encoding dim must be even, got {dim}")
  times = np.linspace(0.0, max_time, num_steps, dtype=np.float32)[:, None]
  freqs = np.exp(
    np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim)
  ).astype(np.float32)
  table = np.zeros((num_steps, dim), np.float32)
  table[:, 0::2] = np.sin(times * freqs)
  table[:, 1::2] = np.cos(times * freqs)
  return table


def interpolate_table(table: jax.Array, time_gap: jax.Array, max_time: float) -> jax.Array:
  """Rows of ``table [S, D]`` at continuous ``time_gap [B]`` (same unit as ``max_time``) -> ``[B, D]``."""
  steps = table.shape[0]
  position = jnp.clip(time_gap.astype(jnp.float32), 0.0, max_time) * ((steps - 1) / max_time)
  lower = jnp.floor(position)
  upper = jnp.minimum(jnp.ceil(position), steps - 1)
  alpha = (position - lower)[:, None]
  return (1.0 - alpha) * table[lower.astype(jnp.int32)] + alpha * table[upper.astype(jnp.int32)]


class ContinuousTimeEncoding(nn.Module):
  """Adds the encoding of a time gap to every token: ``[B, N, D], [B] -> [B, N, D]``.

  Attributes:
    max_time: largest representable gap, in years (larger gaps are clipped).
    num_steps: table rows over [0, max_time].
    dropout_rate: dropout after the addition (BCRBench: 0.1, independent of model dropout).
  """

  max_time: float = 5.0
  num_steps: int = 240
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, tokens: jax.Array, time_gap: jax.Array, deterministic: bool) -> jax.Array:
    """Args: tokens ``[B, N, D]``; time_gap ``[B]`` (or ``[B, 1]``) years; deterministic: no dropout."""
    time_gap = jnp.asarray(time_gap)
    if time_gap.ndim == 2 and time_gap.shape[1] == 1:
      time_gap = time_gap[:, 0]
    if tokens.ndim != 3 or time_gap.shape != tokens.shape[:1]:
      raise ValueError(
        f"expected tokens [B, N, D] and time_gap [B], got {tokens.shape} and {time_gap.shape}"
      )
    table = jnp.asarray(sinusoid_table(tokens.shape[-1], self.max_time, self.num_steps))
    encoding = interpolate_table(table, time_gap, self.max_time).astype(tokens.dtype)
    return nn.Dropout(self.dropout_rate)(tokens + encoding[:, None, :], deterministic=deterministic)
