"""Resizing attribution maps as Captum does (``LayerAttribution.interpolate``, i.e. torch's
``F.interpolate(maps, size, mode)`` with ``align_corners`` left at False).

* ``'nearest'``: torch's legacy rule, output ``i`` reads input
  ``min(floor(float32(i) * float32(n / m)), n - 1)`` (identity when ``m == n``, ``i // 2`` when
  ``m == 2 n``), computed in float32 as torch does. For integer factors this is
  ``jax.image.resize(..., 'nearest')``; for others the float32 product can floor one index lower
  than exact arithmetic (``mammojax.nn.resize.resize_nearest``), as torch does.
* ``'bilinear'`` (``'linear'``, ``'trilinear'``: the same rule on every resized axis): half-pixel
  centres, source ``max(scale * (i + 0.5) - 0.5, 0)`` with ``scale = n / m``; the lower tap is
  its floor (at most ``n - 1``), the upper one the next pixel (or the same at the border).

Axes are resized one after the other, indices and weights computed on the host, so the result
is a gather and a weighted sum: exact for nearest, within float32 rounding of torch for linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("nearest", "bilinear", "linear", "trilinear")


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """torch's nearest source index of every output index, ``[out_size]`` int32."""
  out = np.arange(out_size)
  if out_size == in_size:
    return out.astype(np.int32)
  if out_size == 2 * in_size:
    return (out >> 1).astype(np.int32)
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.floor(out.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(source, in_size - 1).astype(np.int32)


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch's half-pixel linear taps: lower index, upper index, upper weight, ``[out_size]`` each."""
  out = np.arange(out_size)
  if out_size == in_size:
    return out.astype(np.int32), out.astype(np.int32), np.zeros(out_size, np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  source = scale * (out.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
  source = np.maximum(source, np.float32(0.0))
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  weight = np.clip(source - lower.astype(np.float32), 0.0, 1.0).astype(np.float32)
  upper = np.where(lower < in_size - 1, lower + 1, lower)
  return lower.astype(np.int32), upper.astype(np.int32), weight


def interpolate(
  maps: jax.Array, size: Sequence[int], mode: str = "nearest", axes: Sequence[int] | None = None
) -> jax.Array:
  """Resizes ``maps`` along ``axes`` to ``size`` with torch's ``F.interpolate`` rules.

  Args:
    maps: e.g. ``[B, h, w]`` or ``[B, h, w, C]`` (or ``[B, d, h, w]`` for volumes).
    size: the new extent of each resized axis, e.g. the input's ``(H, W)``.
    mode: ``'nearest'`` (Captum's default) or ``'bilinear'`` (``'linear'``, ``'trilinear'``).
    axes: the resized axes; default ``1 .. len(size)``.
  Returns:
    ``maps`` with the resized axes of extent ``size``, e.g. ``[B, H, W]``.
  """
  if mode not in MODES:
    raise ValueError(f"interpolation mode must be one of {MODES}, got {mode!r}")
  maps = jnp.asarray(maps)
  axes = tuple(range(1, 1 + len(size))) if axes is None else tuple(a % maps.ndim for a in axes)
  if len(axes) != len(size):
    raise ValueError(f"size {tuple(size)} needs one entry per resized axis {axes}")
  for axis, new in zip(axes, size):
    new = int(new)
    if mode == "nearest":
      maps = jnp.take(maps, nearest_indices(maps.shape[axis], new), axis=axis)
      continue
    lower, upper, weight = linear_taps(maps.shape[axis], new)
    weight = jnp.asarray(weight, maps.dtype).reshape((-1,) + (1,) * (maps.ndim - axis - 1))
    low = jnp.take(maps, lower, axis=axis)
    high = jnp.take(maps, upper, axis=axis)
    maps = (1 - weight) * low + weight * high
  return maps
