"""Resampling of arrays on regular grids, along any number of spatial axes (2D and 3D).

Arrays are channels-last (``[B, *S, C]``) unless ``axes`` says otherwise. The functions mirror
the PyTorch resamplings the ported models use, so that their outputs match torch's:

* :func:`resize_linear_align_corners`: ``F.interpolate(mode='bilinear' / 'trilinear',
  align_corners=True)``; also runs on numpy arrays (on the host, in their own precision).
* :func:`resize_nearest`: ``F.interpolate(mode='nearest')`` (no half-pixel offset).
* :func:`upsample`: integer-factor up-sampling, nearest or half-pixel linear
  (``align_corners=False``).
* :func:`downsample`: integer-factor average or max pooling, or keeping every ``factor``-th pixel
  (``max_pool(kernel_size=1, stride=factor)``).
* :func:`avg_pool_half`: 2x average pooling with torch's ``ceil_mode=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = TypeVar("Array", jax.Array, np.ndarray)


def _spatial_axes(x, size: Sequence[int], axes: Sequence[int] | None) -> tuple[int, ...]:
  """``axes`` normalised to non-negative ints; default: the ``len(size)`` axes after the batch."""
  axes = tuple(range(1, 1 + len(size))) if axes is None else tuple(a % x.ndim for a in axes)
  if len(axes) != len(size):
    raise ValueError(f"size {tuple(size)} needs one entry per resized axis {axes}")
  return axes


def _align_corners_taps(
  in_size: int, out_size: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Lower and upper source index and upper weight of each output index, ``[out_size]`` each.

  As PyTorch computes them: the scale ``(in - 1) / (out - 1)`` is rounded to ``dtype`` first,
  then multiplied by the output index in ``dtype``.
  """
  scale = dtype.type((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
  source = scale * np.arange(out_size, dtype=dtype)
  lower = np.floor(source).astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1)
  # Exact: the fractional part of a float is representable in its own precision.
  return lower, upper, (source - lower).astype(dtype)


def resize_linear_align_corners(
  x: Array, size: Sequence[int], axes: Sequence[int] | None = None
) -> Array:
  """(Bi/tri)linear resize with torch's ``align_corners=True``.

  Output index ``i`` along an axis of ``n`` -> ``m`` samples input position
  ``i * (n - 1) / (m - 1)`` (0 when ``m == 1``), so the corner pixel centres coincide; there is
  no antialiasing when shrinking, exactly as ``F.interpolate``. Axes are resized one after the
  other, positions computed in float32 (float64 for a float64 ``x``), as torch does.

  Args:
    x: e.g. ``[B, H, W, C]`` or ``[B, D, H, W, C]``; a numpy array is resized with numpy (a
      float64 one in float64), a JAX array with JAX.
    size: the new extent of each resized axis, e.g. ``(h, w)``.
    axes: the resized axes (default ``1 .. len(size)``, the spatial axes of a channels-last
      array); e.g. ``(1, 2)`` for a stack of maps ``[N, H, W]``.
  Returns:
    ``x`` resized, same dtype and type (numpy or JAX).
  """
  xp = np if isinstance(x, np.ndarray) else jnp
  position_dtype = np.dtype(np.float64 if x.dtype == np.float64 else np.float32)
  for axis, new in zip(_spatial_axes(x, size, axes), size):
    lower, upper, frac = _align_corners_taps(x.shape[axis], int(new), position_dtype)
    frac = xp.asarray(frac, x.dtype).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    x = xp.take(x, lower, axis=axis) * (1 - frac) + xp.take(x, upper, axis=axis) * frac
  return x


def resize_nearest(x: Array, size: Sequence[int], axes: Sequence[int] | None = None) -> Array:
  """Nearest-neighbour resize as torch's ``mode='nearest'``: output ``i`` reads input
  ``floor(i * n / m)`` (no half-pixel offset, unlike ``jax.image.resize``).

  Args:
    x: e.g. ``[B, H, W, C]``; ``size`` and ``axes`` as in :func:`resize_linear_align_corners`.
  Returns:
    ``x`` with the resized axes of extent ``size``.
  """
  for axis, new in zip(_spatial_axes(x, size, axes), size):
    index = (np.arange(new) * x.shape[axis]) // new
    x = x[(slice(None),) * axis + (index,)]
  return x


def upsample(
  x: jax.Array, factor: int, method: Literal["nearest", "linear"] = "nearest"
) -> jax.Array:
  """``[B, *S, C] -> [B, *(factor * S), C]``.

  ``'nearest'`` repeats each pixel; ``'linear'`` is half-pixel (bi/tri)linear interpolation,
  ``F.interpolate(scale_factor=factor, align_corners=False)`` (``jax.image.resize``).
  """
  spatial = tuple(factor * n for n in x.shape[1:-1])
  if method == "nearest":
    return resize_nearest(x, spatial)
  if method == "linear":
    return jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), method="linear")
  raise ValueError(f"upsample method must be 'nearest' or 'linear', got {method!r}")


def downsample(
  x: jax.Array, factor: int, method: Literal["avg", "max", "subsample"] = "avg"
) -> jax.Array:
  """``[B, *S, C] -> [B, *(S // factor), C]`` (``ceil`` for ``'subsample'``).

  ``'avg'`` / ``'max'``: pooling over non-overlapping ``factor``-wide windows (incomplete
  windows at the end are dropped, as torch's default floor mode); ``'subsample'``: every
  ``factor``-th pixel starting at the first.
  """
  num_spatial = x.ndim - 2
  window = (factor,) * num_spatial
  if method == "avg":
    return nn.avg_pool(x, window, strides=window)
  if method == "max":
    return nn.max_pool(x, window, strides=window)
  if method == "subsample":
    return x[(slice(None),) + (slice(None, None, factor),) * num_spatial]
  raise ValueError(f"downsample method must be 'avg', 'max' or 'subsample', got {method!r}")


def avg_pool_half(image: jax.Array) -> jax.Array:
  """2x average pooling of ``[B, *S, C]`` to ``[B, *ceil(S / 2), C]``; partial windows at the end
  average only the pixels they cover (torch ``avg_pool(..., 2, ceil_mode=True)``)."""
  spatial = image.shape[1:-1]
  pad = [(0, 0)] + [(0, n % 2) for n in spatial] + [(0, 0)]
  window = (1, *([2] * len(spatial)), 1)
  total = jax.lax.reduce_window(jnp.pad(image, pad), 0.0, jax.lax.add, window, window, "VALID")
  count = jax.lax.reduce_window(
    jnp.pad(jnp.ones((1, *spatial, 1), image.dtype), pad), 0.0, jax.lax.add, window, window, "VALID"
  )
  return total / count
