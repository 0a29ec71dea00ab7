"""Sliding-window inference over N-d channels-last volumes, as MONAI's
``monai.inferers.sliding_window_inference``, compiled as one program per (volume shape, roi).

What matches MONAI (``inferers/utils.py``, ``data/utils.py``):

* Padding: an axis shorter than the roi is padded to the roi with ``cval`` (MONAI's
  ``padding_mode="constant"``), ``floor(diff / 2)`` before and the rest after; the padding is
  cropped from the output.
* Window placement (``_get_scan_interval``, ``dense_patch_slices``): the scan interval is
  ``int(roi * (1 - overlap))``, at least 1 (the roi itself when it equals the padded size);
  windows start at multiples of it until one reaches the end, and the last is moved back to end
  flush with the volume. Order: row-major over the start grid, examples one after the other.
* Blending (``compute_importance_map``): ``"constant"`` weights 1; ``"gaussian"`` the product
  over axes of ``exp(-x^2 / (2 sigma^2))``, ``x`` the offset from the window centre,
  ``sigma = sigma_scale * roi`` (not normalised: 1 at the centre), clamped below at 1e-3. The
  output is ``sum(pred * w) / sum(w)`` over the windows covering each voxel.

What differs from MONAI: windows are cut from the padded volume with ``lax.dynamic_slice`` at
start offsets fixed at trace time, ``sw_batch_size`` windows per step of a ``lax.scan``, and
added into a float32 output buffer with ``dynamic_update_slice``, so the program size does not
grow with the number of windows and the volume is never copied per window. The predictor
returns the roi shape (MONAI's zoomed outputs, tuple / dict outputs, ``roi_weight_map``,
``process_fn`` and the device buffering are not supported).

Reusing programs: the jitted core is keyed on the input shape and dtype, the roi, overlap,
mode, sigma, ``sw_batch_size``, the ``predictor`` object and ``output_dtype``; pass model
parameters through ``predictor_args`` (traced) rather than a new closure per call. Volumes of
different sizes share a program when the caller pads them to a common bucket shape and crops
the output; the windows are then :func:`window_starts` of the bucket, so the result equals
MONAI's on the padded volume. :func:`grid_shape` gives the smallest bucket whose windows sit on a
regular grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

# MONAI's compute_importance_map clamps the weights below at this value.
_MIN_WEIGHT = 1e-3


def _per_axis(value: Any, ndim: int, name: str) -> tuple:
  values = tuple(value) if isinstance(value, Sequence) else (value,) * ndim
  if len(values) != ndim:
    raise ValueError(f"{name} needs one value or one per spatial axis ({ndim}), got {value}.")
  return values


def _roi(roi_size: Any, shape: Sequence[int]) -> tuple[int, ...]:
  """MONAI's ``fall_back_tuple``: a None or non-positive entry takes the volume's size."""
  roi = _per_axis(roi_size, len(shape), "roi_size")
  out = []
  for r, s in zip(roi, shape):
    if r is not None and int(r) != r:
      raise ValueError(f"roi_size entries must be integers, got {roi_size}.")
    out.append(int(s) if r is None or r <= 0 else int(r))
  return tuple(out)


def _overlaps(overlap: Any, ndim: int) -> tuple[float, ...]:
  overlaps = tuple(float(o) for o in _per_axis(overlap, ndim, "overlap"))
  if any(not 0.0 <= o < 1.0 for o in overlaps):
    raise ValueError(f"overlap must be in [0, 1) on every axis, got {overlap}.")
  return overlaps


def _scan_interval(size: int, roi: int, overlap: float) -> int:
  if roi == size:
    return roi
  return max(int(roi * (1 - overlap)), 1)


def window_starts(
  shape: Sequence[int], roi_size: Sequence[int] | int, overlap: Sequence[float] | float = 0.25
) -> np.ndarray:
  """Start offsets of MONAI's windows over a volume, ``[n, ndim]`` int (row-major order).

  Args:
    shape: the spatial shape ``S`` (no batch or channel axis).
    roi_size: the window shape, one int or one per axis (None / <= 0: the whole axis).
    overlap: in ``[0, 1)``, one or one per axis.

  Returns:
    The starts in the coordinates of the volume padded to at least the roi on every axis
    (``floor(diff / 2)`` before), where windows are cut; each window is ``[start, start + roi)``.
  """
  shape = tuple(int(s) for s in shape)
  roi = _roi(roi_size, shape)
  overlaps = _overlaps(overlap, len(shape))
  per_axis = []
  for size, r, o in zip(shape, roi, overlaps):
    size = max(size, r)
    interval = _scan_interval(size, r, o)
    count = 1
    while (count - 1) * interval + r < size:
      count += 1
    starts = [min(i * interval, size - r) for i in range(count)]
    per_axis.append(starts)
  grid = np.meshgrid(*per_axis, indexing="ij")
  return np.stack([g.reshape(-1) for g in grid], axis=-1).astype(np.int64)


def grid_shape(
  shape: Sequence[int], roi_size: Sequence[int] | int, overlap: Sequence[float] | float = 0.25
) -> tuple[int, ...]:
  """The smallest spatial shape ``>= shape`` (and ``>= roi``) whose windows all start at
  multiples of the scan interval (none moved back to end flush): ``roi + k * interval`` per
  axis. A bucket shape for :func:`sliding_window_inference` that changes no window placement
  near the volume's start."""
  shape = tuple(int(s) for s in shape)
  roi = _roi(roi_size, shape)
  out = []
  for size, r, o in zip(shape, roi, _overlaps(overlap, len(shape))):
    if size <= r:
      out.append(r)
      continue
    interval = _scan_interval(size, r, o)
    out.append(r + math.ceil((size - r) / interval) * interval)
  return tuple(out)


def importance_map(
  roi_size: Sequence[int],
  mode: Literal["constant", "gaussian"] = "constant",
  sigma_scale: Sequence[float] | float = 0.125,
) -> np.ndarray:
  """MONAI's ``compute_importance_map``: the blending weights of one window, ``[*roi]`` float32."""
  roi = tuple(int(r) for r in roi_size)
  if mode == "constant":
    return np.ones(roi, np.float32)
  if mode != "gaussian":
    raise ValueError(f'mode must be "constant" or "gaussian", got {mode!r}.')
  scales = _per_axis(sigma_scale, len(roi), "sigma_scale")
  weights = np.ones((), np.float32)
  for axis, (r, scale) in enumerate(zip(roi, scales)):
    if scale <= 0:
      raise ValueError(f"sigma_scale must be positive, got {sigma_scale}.")
    # float32 as MONAI computes it: offsets from the centre, -(r - 1) / 2 .. (r - 1) / 2.
    x = np.arange(r, dtype=np.float32) - np.float32((r - 1) / 2.0)
    sigma = r * scale
    g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
    weights = weights[..., None] * g.reshape((1,) * axis + (r,))
  return np.maximum(weights, max(float(weights.min()), _MIN_WEIGHT)).astype(np.float32)


def sliding_window_inference(
  inputs: jax.Array,
  roi_size: Sequence[int] | int,
  sw_batch_size: int,
  predictor: Callable[..., jax.Array],
  overlap: Sequence[float] | float = 0.25,
  mode: Literal["constant", "gaussian"] = "constant",
  sigma_scale: Sequence[float] | float = 0.125,
  cval: float = 0.0,
  output_dtype: Any = None,
  predictor_args: tuple = (),
  example_args: tuple = (),
) -> jax.Array:
  """Blend a predictor's outputs over overlapping windows (MONAI's ``sliding_window_inference``).

  Args:
    inputs: ``[B, *S, C]`` channels-last volumes (MONAI: ``[B, C, *S]``).
    roi_size: window shape ``R``, one int or one per spatial axis (None / <= 0: the whole axis).
    sw_batch_size: windows per predictor call; the last call is filled up with repeats of a
      window that are given weight 0.
    predictor: ``predictor(windows [n, *R, C], *predictor_args) -> [n, *R, K]``, traceable by
      jax; it must be hashable (a function, not a fresh ``functools.partial`` per call, for the
      compiled program to be reused). It is traced twice per compilation (once for its output
      shape).
    overlap: in ``[0, 1)``, one or one per axis.
    mode / sigma_scale: MONAI's blending, ``"constant"`` or ``"gaussian"`` with
      ``sigma = sigma_scale * R``.
    cval: the value padding axes shorter than the roi (MONAI's constant ``padding_mode``).
    output_dtype: dtype of the result; None keeps the predictor's. Accumulation is float32.
    predictor_args: arrays (any pytree) passed to the predictor, e.g. model variables; traced,
      so new values reuse the program.
    example_args: arrays with a leading axis ``B`` (any pytree), e.g. each volume's contrast
      presence ``[B, K]``; each window's predictor call gets the rows of the windows' volumes,
      ``[n, ...]``, after ``predictor_args``.

  Returns:
    ``[B, *S, K]``.
  """
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 3:
    raise ValueError(
      f"inputs must be [B, *S, C] with at least one spatial axis, got {inputs.shape}."
    )
  spatial = inputs.shape[1:-1]
  if isinstance(roi_size, Sequence) and len(roi_size) != len(spatial):
    raise ValueError(
      f"roi_size {tuple(roi_size)} has {len(roi_size)} axes but inputs {inputs.shape} "
      f"[B, *S, C] have {len(spatial)} spatial axes (inputs are channels-last)."
    )
  if int(sw_batch_size) != sw_batch_size or sw_batch_size < 1:
    raise ValueError(f"sw_batch_size must be a positive integer, got {sw_batch_size}.")
  if mode not in ("constant", "gaussian"):
    raise ValueError(f'mode must be "constant" or "gaussian", got {mode!r}.')
  roi = _roi(roi_size, spatial)
  overlaps = _overlaps(overlap, len(spatial))
  sigma = tuple(float(s) for s in _per_axis(sigma_scale, len(spatial), "sigma_scale"))
  return _sliding_window(
    inputs,
    predictor_args,
    example_args,
    jnp.asarray(cval, inputs.dtype),
    roi=roi,
    overlap=overlaps,
    mode=mode,
    sigma_scale=sigma,
    sw_batch_size=int(sw_batch_size),
    predictor=predictor,
    output_dtype=None if output_dtype is None else jnp.dtype(output_dtype),
  )


def _add_window(buffer: jax.Array, start: tuple, values: jax.Array) -> jax.Array:
  current = jax.lax.dynamic_slice(buffer, start, values.shape)
  return jax.lax.dynamic_update_slice(buffer, current + values, start)


@functools.partial(
  jax.jit,
  static_argnames=(
    "roi",
    "overlap",
    "mode",
    "sigma_scale",
    "sw_batch_size",
    "predictor",
    "output_dtype",
  ),
)
def _sliding_window(
  inputs,
  predictor_args,
  example_args,
  cval,
  *,
  roi,
  overlap,
  mode,
  sigma_scale,
  sw_batch_size,
  predictor,
  output_dtype,
):
  batch, spatial, channels = inputs.shape[0], inputs.shape[1:-1], inputs.shape[-1]
  ndim = len(spatial)
  pad_before = tuple(max(r - s, 0) // 2 for r, s in zip(roi, spatial))
  pad_after = tuple(max(r - s, 0) - b for r, s, b in zip(roi, spatial, pad_before))
  padded = jnp.pad(inputs, [(0, 0), *zip(pad_before, pad_after), (0, 0)], constant_values=cval)
  image = padded.shape[1:-1]

  starts = window_starts(spatial, roi, overlap)
  num_windows = len(starts)
  total = batch * num_windows
  steps = -(-total // sw_batch_size)
  # Windows in MONAI's order (example-major), the last step filled up with weight-0 repeats.
  index = np.arange(steps * sw_batch_size)
  used = (index < total).astype(np.float32)
  index = np.minimum(index, total - 1)
  xs = (
    jnp.asarray((index // num_windows).reshape(steps, sw_batch_size), jnp.int32),
    jnp.asarray(starts[index % num_windows].reshape(steps, sw_batch_size, ndim), jnp.int32),
    jnp.asarray(used.reshape(steps, sw_batch_size)),
  )
  weights = jnp.asarray(importance_map(roi, mode, sigma_scale))

  def cut(example, start):
    begin = (example, *(start[d] for d in range(ndim)), 0)
    return jax.lax.dynamic_slice(padded, begin, (1, *roi, channels))[0]

  def predict(example, start):
    rows = jax.tree.map(lambda a: jnp.take(a, example, axis=0), example_args)
    return predictor(jax.vmap(cut)(example, start), *predictor_args, *rows)

  out_spec = jax.eval_shape(predict, xs[0][0], xs[1][0])
  if out_spec.ndim != ndim + 2 or out_spec.shape[:-1] != (sw_batch_size, *roi):
    raise ValueError(
      f"predictor must map windows [{sw_batch_size}, *{roi}, {channels}] to "
      f"[{sw_batch_size}, *{roi}, K], got {out_spec.shape}."
    )
  classes = out_spec.shape[-1]

  def step(total_sum, x):
    example, start, use = x
    blended = predict(example, start).astype(jnp.float32) * weights[..., None]
    blended = blended * use.reshape((-1,) + (1,) * (ndim + 1))

    def add(i, acc):
      begin = (example[i], *(start[i, d] for d in range(ndim)), 0)
      return _add_window(acc, begin, blended[i][None])

    return jax.lax.fori_loop(0, sw_batch_size, add, total_sum), None

  total_sum = jnp.zeros((batch, *image, classes), jnp.float32)
  total_sum, _ = jax.lax.scan(step, total_sum, xs)

  # The weight sum per voxel, the same for every example (MONAI's count map).
  starts_array = jnp.asarray(starts, jnp.int32)

  def count(i, acc):
    return _add_window(acc, tuple(starts_array[i, d] for d in range(ndim)), weights)

  weight_sum = jax.lax.fori_loop(0, num_windows, count, jnp.zeros(image, jnp.float32))
  blended = total_sum / weight_sum[None, ..., None]
  crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
  blended = blended[(slice(None), *crop, slice(None))]
  return blended.astype(out_spec.dtype if output_dtype is None else output_dtype)
