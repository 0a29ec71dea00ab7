"""Interpolation of channels-last images, volumes and feature maps at arbitrary coordinates.

:func:`sample` is the kernel under :func:`mammojax.nn.warp.warp` and the ICON transforms; the
public API for callers is ``mammojax.nn.warp`` (which re-exports :func:`sample`). This module
holds the interpolation itself: corner indices and weights per axis, the padding modes, and the
two implementations with their custom gradients. Conventions are those of
``mammojax/nn/warp.py``: ``source [B, *S, C]``, coordinates ``[B, *Q, n]`` in pixels, 'ij'.

* ``'gather'``: gathers whole ``C``-vectors per interpolation corner from a
  ``[B * prod(S), C]`` table, contiguous in memory (with few channels, both corners along the
  last axis in one two-row slice), from indices materialised before the gathers; the fast
  path for feature maps, displacement fields and images.
* ``'map_coordinates'``: ``jax.scipy.ndimage.map_coordinates`` per channel; the reference.

Padding outside the source: ``'zeros'`` (each out-of-range interpolation corner contributes 0,
as ``grid_sample(padding_mode='zeros')`` and scipy's ``'grid-constant'``), ``'border'``
(coordinates clamped to ``[0, N-1]``, scipy ``'nearest'``) or ``'reflect'`` (half-sample
symmetric, ``d c b a | a b c d | d c b a``, scipy ``'reflect'``).
"""

from __future__ import annotations

import functools
import itertools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.nn.fusion_barrier import computed_apart

Padding = Literal["zeros", "border", "reflect"]
Impl = Literal["gather", "map_coordinates"]

_PADDINGS = ("zeros", "border", "reflect")
_SCIPY_MODES = {"zeros": "constant", "border": "nearest", "reflect": "reflect"}


# ----------------------------------------------------------------------------- sampling


def sample(
  source: jax.Array,
  coordinates: jax.Array,
  *,
  order: int = 1,
  padding: Padding = "zeros",
  impl: Impl = "gather",
) -> jax.Array:
  """Interpolates ``source`` at arbitrary pixel coordinates.

  Args:
    source: ``[B, *S, C]`` with ``len(S)`` = 2 or 3.
    coordinates: ``[B, *Q, n]`` pixels, 'ij' order, ``n = len(S)``; ``Q`` is any shape.
    order: 0 (nearest, ties rounded away from zero) or 1 (bi/trilinear).
    padding: ``'zeros'``, ``'border'`` or ``'reflect'`` (see module docstring).
    impl: ``'gather'`` or ``'map_coordinates'``; same values and reverse-mode gradients
      (``'gather'`` has a custom VJP, so forward-mode ``jax.jvp`` needs ``'map_coordinates'``).
  Returns:
    ``[B, *Q, C]`` in ``source.dtype``.
  """
  _check_sample_args(source, coordinates, order, padding)
  if impl == "gather":
    return _sample_gather(source, coordinates, order, padding)
  if impl == "map_coordinates":
    return _sample_map_coordinates(source, coordinates, order, padding)
  raise ValueError(f"impl must be 'gather' or 'map_coordinates', got {impl!r}")


def _sample_map_coordinates(source, coordinates, order, padding):
  num_axes = source.ndim - 2

  def one_channel(volume, coords):  # [*S], [*Q, n]
    return jax.scipy.ndimage.map_coordinates(
      volume,
      [coords[..., axis] for axis in range(num_axes)],
      order=order,
      mode=_SCIPY_MODES[padding],
      cval=0.0,
    )

  per_example = jax.vmap(one_channel, in_axes=(num_axes, None), out_axes=-1)
  return jax.vmap(per_example)(source, coordinates)


def _reflect(coordinate: jax.Array, size: int) -> jax.Array:
  """Folds coordinates into ``[-0.5, size - 0.5]`` by half-sample symmetric reflection."""
  period = 2.0 * size
  folded = jnp.mod(coordinate + 0.5, period)
  return jnp.where(folded > size, period - folded, folded) - 0.5


def _prepare_axis_coordinate(coordinate: jax.Array, size: int, padding: str) -> jax.Array:
  if padding == "reflect":
    coordinate = _reflect(coordinate, size)
  if padding in ("border", "reflect"):
    # Clamping the coordinate (not the index) gives zero gradient outside, like grid_sample.
    coordinate = _clamp(coordinate, 0.0, size - 1.0)
  return coordinate


@jax.custom_jvp
def _clamp(x: jax.Array, low: float, high: float) -> jax.Array:
  """``clip(x, low, high)`` with derivative 1 on the closed interval and 0 outside.

  ``jnp.clip`` gives 1/2 at the bounds themselves, which is exactly where the edge pixels of an
  identity map sit; ``grid_sample``'s border padding passes the full gradient there.
  """
  return jnp.clip(x, low, high)


@_clamp.defjvp
def _clamp_jvp(primals, tangents):
  x, low, high = primals
  inside = (x >= low) & (x <= high)
  return _clamp(x, low, high), jnp.where(inside, tangents[0], jnp.zeros_like(tangents[0]))


def _axis_corners(coordinate: jax.Array, size: int, order: int, padding: str):
  """Corners along one axis: list of (int32 index in ``[0, size)``, weight or None, in-range mask
  or None); out-of-range corners (zero padding) have their index clipped and mask False."""
  coordinate = _prepare_axis_coordinate(coordinate, size, padding)
  if order == 0:
    # lax.round rounds ties away from zero, as jax.scipy's map_coordinates.
    indices = [(jax.lax.round(coordinate), None)]
  else:
    lower = jnp.floor(coordinate)
    upper_weight = coordinate - lower
    indices = [(lower, 1.0 - upper_weight), (lower + 1.0, upper_weight)]
  corners = []
  for index, weight in indices:
    index = index.astype(jnp.int32)
    valid = (index >= 0) & (index < size) if padding == "zeros" else None
    corners.append((jnp.clip(index, 0, size - 1), weight, valid))
  return corners


def _pad_last_axis(source: jax.Array, padding: str) -> jax.Array:
  """Pads the last spatial axis of ``[B, *S, C]`` as :func:`_paired_corners` expects: one zero
  on each side (zero padding) or the edge repeated once at the end (border, reflect)."""
  widths = [(0, 0)] * (source.ndim - 2) + [(1, 1) if padding == "zeros" else (0, 1), (0, 0)]
  return jnp.pad(source, widths, mode="constant" if padding == "zeros" else "edge")


# XLA:CPU gathers a slice of a few rows for about the cost of one row (measured on a
# [100352, 2] table: two rows 0.25 ms, one row 0.16 ms, four separate rows 0.7 ms).
_PAIRED_MAX_CHANNELS = 4


def _sample_gather(source, coordinates, order, padding):
  """Weighted row gathers from ``source`` viewed as a ``[B * prod(S), C]`` table.

  With few channels (displacement fields, images) and linear interpolation, the two corners
  along the last axis are neighbouring rows, so one gather of a two-row slice fetches both:
  ``2**(n-1)`` gathers instead of ``2**n`` (the last axis padded by one pixel for that;
  :func:`_paired_interpolation`). With many channels (feature maps) every corner is its own row
  gather and the source is not copied (:func:`_weighted_row_gather`).
  """
  batch, *spatial, channels = source.shape
  num_axes = len(spatial)
  points = coordinates.reshape(batch, -1, num_axes)
  if order == 1 and channels <= _PAIRED_MAX_CHANNELS:
    # Padded in a region of its own: fused into the gathers, the pad's selects were redone per
    # gathered element (XLA:CPU: 0.2 ms against 0.02 ms per pad of a [128, 28, 28, 2] field).
    padded = computed_apart(lambda s: _pad_last_axis(s, padding), source)
    table_spatial = padded.shape[1:-1]
    table = padded.reshape(-1, channels)
    layout = _PairedLayout(
      tuple(spatial),
      tuple(int(n) for n in np.cumprod([1, *table_spatial[::-1][:-1]])[::-1]),
      padding,
      points.shape[1],
      int(np.prod(table_spatial)),
    )
    prepared = tuple(
      _prepare_axis_coordinate(points[..., axis], spatial[axis], padding).reshape(-1)
      for axis in range(num_axes)
    )
    out = _paired_interpolation(table, prepared, layout)
    return out.reshape(batch, *coordinates.shape[1:-1], channels)

  corner_indices, corner_weights = computed_apart(
    lambda p: _corner_rows(p, tuple(spatial), order, padding), points
  )
  out = _weighted_row_gather(source.reshape(-1, channels), corner_indices, corner_weights)
  return out.reshape(batch, *coordinates.shape[1:-1], channels)


def _corner_rows(points: jax.Array, spatial: tuple[int, ...], order: int, padding: str):
  """Per interpolation corner, the ``[N]`` row of ``[B * prod(S), C]`` it reads and its ``[N]``
  weight, for ``points [B, P, n]`` (``N = B * P``); zero padding zeroes the weight of corners
  outside the grid."""
  batch, num_points, num_axes = points.shape
  strides = np.cumprod([1] + list(spatial[::-1][:-1]))[::-1]
  index = (jnp.arange(batch, dtype=jnp.int32) * int(np.prod(spatial)))[:, None]
  per_axis = [
    _axis_corners(points[..., axis], spatial[axis], order, padding) for axis in range(num_axes)
  ]
  corner_indices, corner_weights = [], []
  for combo in itertools.product(*per_axis):
    corner_index, weight = index, None
    for stride, (axis_index, axis_weight, valid) in zip(strides, combo):
      corner_index = corner_index + axis_index * int(stride)
      if axis_weight is not None:
        weight = axis_weight if weight is None else weight * axis_weight
      if valid is not None:
        weight = jnp.where(valid, 1.0 if weight is None else weight, 0.0)
    if weight is None:
      weight = jnp.ones((batch, num_points), points.dtype)
    corner_indices.append(corner_index.reshape(-1))
    corner_weights.append(weight.reshape(-1))
  return tuple(corner_indices), tuple(corner_weights)


_ROW_UPDATES = jax.lax.ScatterDimensionNumbers(
  update_window_dims=(1, 2), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,)
)
_ROW_SLICES = jax.lax.GatherDimensionNumbers(
  offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0,)
)


def _take_rows(table: jax.Array, index: jax.Array, count: int) -> jax.Array:
  """``table[index + k]`` for ``k < count``: ``[R, C]``, ``[N]`` -> ``[N, count, C]``; indices
  are known to be in range.

  ``lax.gather`` directly: jnp indexing would add a negative-index wrap to every index.
  """
  return jax.lax.gather(
    table,
    index[:, None],
    _ROW_SLICES,
    (count, table.shape[1]),
    mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


def _add_rows(table: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
  """``table[index + k] += rows[:, k]`` for ``rows [N, count, C]`` (see :func:`_take_rows`)."""
  return jax.lax.scatter_add(
    table, index[:, None], rows, _ROW_UPDATES, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
  )


@jax.custom_vjp
def _weighted_row_gather(
  table: jax.Array, indices: tuple[jax.Array, ...], weights: tuple[jax.Array, ...]
) -> jax.Array:
  """``sum_k weights[k][:, None] * table[indices[k]]``: ``[R, C]``, K x ``[N]`` (in ``[0, R)``),
  K x ``[N]`` -> ``[N, C]``.

  The custom VJP exists for speed: autodiff of the gathers would zero-fill and add K separate
  ``[R, C]`` scatters; here they accumulate into one buffer, and the weight gradients are
  fused gather-and-reduce loops. Corners travel as tuples, not stacked arrays: XLA:CPU's
  concatenations of them measured slower than the gathers.
  """
  return _gathered_sum(table, indices, weights)


def _gathered_sum(table, indices, weights):
  out = None
  for index, weight in zip(indices, weights):
    term = _take_rows(table, index, 1)[:, 0] * weight[:, None].astype(table.dtype)
    out = term if out is None else out + term
  return out


def _weighted_row_gather_fwd(table, indices, weights):
  return _gathered_sum(table, indices, weights), (table, indices, weights)


def _weighted_row_gather_bwd(residuals, cotangent):
  table, indices, weights = residuals
  table_grad = _zeros_for_scatter(table, cotangent)
  weight_grads = []
  for index, weight in zip(indices, weights):
    table_grad = _add_rows(table_grad, index, _outer_rows((weight,), cotangent))
    rows = _take_rows(table, index, 1)[:, 0].astype(weight.dtype)
    weight_grads.append(_row_dot(rows, cotangent.astype(weight.dtype)))
  return table_grad, tuple(None for _ in indices), tuple(weight_grads)


def _zeros_for_scatter(like: jax.Array, cotangent: jax.Array) -> jax.Array:
  """Zeros shaped like ``like`` for one scatter to accumulate into, in a buffer of its own.

  ``jnp.zeros_like`` is one constant that XLA shares between every scatter of the program and
  then copies once per scatter (measured 0.47 ms per copy of a [103936, 2] table on XLA:CPU);
  computed apart from this call's ``cotangent``, each scatter gets a fresh zero-filled buffer.
  """
  return computed_apart(lambda _: jnp.zeros(like.shape, like.dtype), cotangent)


def _outer_rows(row_weights: tuple[jax.Array, ...], cotangent: jax.Array) -> jax.Array:
  """``[N, K, C]`` with ``[:, k] = row_weights[k][:, None] * cotangent``, built by selects:
  XLA:CPU's concatenation (``jnp.stack``) of the K terms measured 1 ms against 0.2 ms."""
  position = jax.lax.broadcasted_iota(jnp.int32, (1, len(row_weights), 1), 1)
  weight = row_weights[-1][:, None, None]
  for k in reversed(range(len(row_weights) - 1)):
    weight = jnp.where(position == k, row_weights[k][:, None, None], weight)
  return weight.astype(cotangent.dtype) * cotangent[:, None, :]


def _row_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sum(a * b, axis=-1)`` for ``[N, C]`` rows. Few channels (displacement fields) are summed
  as unrolled elementwise terms: XLA:CPU otherwise hands the product-reduction to a library
  kernel whose per-call cost dominated chained ICON compositions (measured 0.3 ms per call)."""
  if a.shape[-1] <= 8:
    return sum(a[:, c] * b[:, c] for c in range(a.shape[-1]))
  return jnp.sum(a * b, axis=-1)


_weighted_row_gather.defvjp(_weighted_row_gather_fwd, _weighted_row_gather_bwd)


class _PairedLayout(NamedTuple):
  """Static facts of a paired interpolation (:func:`_paired_interpolation`)."""

  spatial: tuple[int, ...]  # the source grid S
  strides: tuple[int, ...]  # row strides of the table (the source padded along the last axis)
  padding: str
  points_per_example: int
  rows_per_example: int


def _paired_corners(coordinates, layout):
  """Corner rows, weights and weight slopes of every point (:func:`_paired_interpolation`).

  Returns ``(rows, weights, slopes)``: per corner group of the leading axes, the ``[N]`` row of
  its lower last-axis corner; per axis the ``(lower, upper)`` weights, ``[N]`` each; per axis the
  derivatives of those weights in the coordinate (``-1`` and ``+1`` where the corner counts, 0
  where zero padding drops it), or None where they are the constants -1 and +1.
  """
  *leading, last = coordinates
  zeros = layout.padding == "zeros"
  weights, slopes, rows_by_axis = [], [], []
  for axis, coordinate in enumerate(leading):
    size = layout.spatial[axis]
    lower = jnp.floor(coordinate)
    upper_weight = coordinate - lower
    index = lower.astype(jnp.int32)
    corner_rows, corner_weights, corner_slopes = [], [], []
    for offset, weight in ((0, 1.0 - upper_weight), (1, upper_weight)):
      corner = index + offset
      if zeros:
        valid = ((corner >= 0) & (corner < size)).astype(coordinate.dtype)
        weight = weight * valid
        corner_slopes.append(valid if offset else -valid)
      corner_rows.append(jnp.clip(corner, 0, size - 1) * layout.strides[axis])
      corner_weights.append(weight)
    rows_by_axis.append(corner_rows)
    weights.append(tuple(corner_weights))
    slopes.append(tuple(corner_slopes) if zeros else None)

  size = layout.spatial[-1]
  lower = jnp.floor(last)
  upper_weight = last - lower
  lower_weight = 1.0 - upper_weight
  if zeros:
    # One zero on each side of the last axis: lower corners -1 .. size-1 read zeros where they
    # fall outside; beyond that both corners are outside and both weights are zero.
    inside = ((lower >= -1.0) & (lower <= size - 1.0)).astype(last.dtype)
    lower_weight, upper_weight = lower_weight * inside, upper_weight * inside
    last_row = (jnp.clip(lower, -1.0, size - 1.0) + 1.0).astype(jnp.int32)
    slopes.append((-inside, inside))
  else:
    # Clamped into [0, size-1]; the upper corner of size-1 is the edge pixel repeated.
    last_row = lower.astype(jnp.int32)
    slopes.append(None)
  weights.append((lower_weight, upper_weight))
  batch = last.shape[0] // layout.points_per_example
  # Each example's first table row, broadcast rather than derived by an integer division per
  # point (iota // points_per_example), which costs more than the rest of this function.
  first_rows = jnp.arange(batch, dtype=jnp.int32)[:, None] * layout.rows_per_example
  first_rows = jnp.broadcast_to(first_rows, (batch, layout.points_per_example)).reshape(-1)
  last_row = last_row + first_rows
  rows = tuple(sum(combo, last_row) for combo in itertools.product(*rows_by_axis))
  return rows, tuple(weights), tuple(slopes)


def _group_scales(weights):
  """Per corner group of the leading axes: (its offsets, the product of their weights)."""
  leading = weights[:-1]
  for offsets in itertools.product((0, 1), repeat=len(leading)):
    scale = None
    for (lower, upper), o in zip(leading, offsets):
      side = upper if o else lower
      scale = side if scale is None else scale * side
    yield offsets, scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _paired_interpolation(
  table: jax.Array, coordinates: tuple[jax.Array, ...], layout: _PairedLayout
) -> jax.Array:
  """Multilinear interpolation with both last-axis corners in one two-row gather.

  Args:
    table: ``[B * prod(S'), C]``, the source padded along its last axis (:func:`_pad_last_axis`)
      and flattened.
    coordinates: per axis ``[N]`` pixel coordinates ('ij'), already folded or clamped by
      :func:`_prepare_axis_coordinate`; point ``i`` belongs to example
      ``i // layout.points_per_example``.
    layout: static shapes and padding.
  Returns:
    ``[N, C]``.

  The custom VJP returns the coordinate gradient directly (weight slopes times corner values),
  instead of autodiff through every corner weight: on XLA:CPU each of those elementwise passes
  over the points costs about as much as a gather.
  """
  rows, weights = computed_apart(lambda c: _paired_corners(c, layout)[:2], coordinates)
  return _paired_sum(table, rows, weights)


def _paired_sum(table, rows, weights):
  lower, upper = weights[-1]
  out = None
  for row, (_, scale) in zip(rows, _group_scales(weights)):
    pair = _take_rows(table, row, 2)
    term = pair[:, 0] * (scale * lower)[:, None].astype(table.dtype) + pair[:, 1] * (scale * upper)[
      :, None
    ].astype(table.dtype)
    out = term if out is None else out + term
  return out


def _paired_interpolation_fwd(table, coordinates, layout):
  rows, weights, slopes = computed_apart(lambda c: _paired_corners(c, layout), coordinates)
  return _paired_sum(table, rows, weights), (table, rows, weights, slopes)


def _paired_interpolation_bwd(layout, residuals, cotangent):
  del layout
  table, rows, weights, slopes = residuals
  lower, upper = weights[-1]
  lower_slope, upper_slope = slopes[-1] or (-1.0, 1.0)
  table_grad = _zeros_for_scatter(table, cotangent)
  grads = [None] * len(weights)

  def accumulate(axis, value):
    grads[axis] = value if grads[axis] is None else grads[axis] + value

  for row, (offsets, scale) in zip(rows, _group_scales(weights)):
    table_grad = _add_rows(table_grad, row, _outer_rows((scale * lower, scale * upper), cotangent))
    pair = _take_rows(table, row, 2).astype(lower.dtype)
    cot = cotangent.astype(lower.dtype)
    lower_dot, upper_dot = _row_dot(pair[:, 0], cot), _row_dot(pair[:, 1], cot)
    accumulate(-1, scale * (lower_slope * lower_dot + upper_slope * upper_dot))
    along_last = lower * lower_dot + upper * upper_dot
    for axis, o in enumerate(offsets):
      term = along_last
      for other, ((other_lower, other_upper), p) in enumerate(zip(weights[:-1], offsets)):
        if other != axis:
          term = term * (other_upper if p else other_lower)
      slope = slopes[axis][o] if slopes[axis] is not None else (1.0 if o else -1.0)
      accumulate(axis, term * slope)
  return table_grad, tuple(grads)


_paired_interpolation.defvjp(_paired_interpolation_fwd, _paired_interpolation_bwd)


def _check_sample_args(source, coordinates, order, padding):
  num_axes = source.ndim - 2
  if num_axes not in (2, 3):
    raise ValueError(f"source must be [B, H, W, C] or [B, D, H, W, C], got {source.shape}")
  if coordinates.ndim < 2 or coordinates.shape[-1] != num_axes:
    raise ValueError(
      f"coordinates must be [B, ..., {num_axes}] for a source {source.shape}, got "
      f"{coordinates.shape}"
    )
  if coordinates.shape[0] != source.shape[0]:
    raise ValueError(
      f"coordinates {coordinates.shape} and source {source.shape} must share the batch size"
    )
  if order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
  if padding not in _PADDINGS:
    raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
