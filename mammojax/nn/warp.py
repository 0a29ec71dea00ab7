"""Sampling and warping of images, volumes and feature maps by dense coordinate maps (2D and 3D).

Conventions (docs/ARCHITECTURE.md, "Coordinates"):

* Arrays are channels-last: images ``[B, H, W, C]``, volumes ``[B, D, H, W, C]``.
* A displacement ``u`` is ``[B, *S, n]`` (``n`` = 2 or 3) in **pixels**, 'ij' order (channel 0 =
  first spatial axis, i.e. rows in 2D / depth in 3D), and the warped array is
  ``warped(x) = source(x + u(x))``.
* Coordinates are ``[B, *Q, n]`` pixel positions in 'ij' order; pixel ``k`` has its centre at
  coordinate ``k``.
* Outside the source, ``padding`` decides: ``'zeros'`` (each out-of-range interpolation corner
  contributes 0, as ``grid_sample(padding_mode='zeros')`` and scipy's ``'grid-constant'``),
  ``'border'`` (coordinates clamped to ``[0, N-1]``, scipy ``'nearest'``) or ``'reflect'``
  (half-sample symmetric, ``d c b a | a b c d | d c b a``, scipy ``'reflect'``).

Two implementations give the same values and gradients (tested): ``'gather'`` (fast) and
``'map_coordinates'`` (the reference); the interpolation kernels are in
``mammojax/nn/sampling.py``, and :func:`sample` is re-exported here. This module is the public
API: sampling, warping, displacement algebra (resize, compose), unit conversions and Jacobians.

Other unit systems, converted only at boundaries:

* ICON's *unit* coordinates: ``[0, 1]`` per axis with the first and last pixel centres at 0 and 1
  (``unit = pixel / (N - 1)``).
* ``torch.nn.functional.grid_sample`` grids: ``[-1, 1]``, 'xy' order (last spatial axis first);
  with ``align_corners=True`` the corner pixel centres sit at -1 and 1, with ``False`` the
  corner pixel edges do.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mammojax.nn.sampling import Impl, Padding, sample

__all__ = [
  "Impl",
  "Padding",
  "compose_displacements",
  "count_folds",
  "grid_sample_to_pixels",
  "identity_map",
  "jacobian_determinant",
  "pixels_to_grid_sample",
  "pixels_to_unit",
  "resize_displacement",
  "sample",
  "unit_spacing",
  "unit_to_pixels",
  "warp",
]

# ----------------------------------------------------------------------------- identity maps


def identity_map(spatial_shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Pixel coordinates of every position of a grid, ``[*S, n]`` in 'ij' order (n = len(S))."""
  axes = [jnp.arange(size, dtype=dtype) for size in spatial_shape]
  return jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1)


# ----------------------------------------------------------------------------- warping


def _warp_coordinates(source: jax.Array, displacement: jax.Array) -> jax.Array:
  _check_shapes(source, displacement)
  # At least float32: bfloat16 cannot even represent every pixel index above 256.
  dtype = jnp.promote_types(displacement.dtype, jnp.float32)
  return identity_map(source.shape[1:-1], dtype=dtype) + displacement.astype(dtype)


def warp(
  source: jax.Array,
  displacement: jax.Array,
  impl: Impl = "gather",
  *,
  order: int = 1,
  padding: Padding = "zeros",
) -> jax.Array:
  """Warps ``source [B, *S, C]`` by ``displacement [B, *S, n]`` (pixels, 'ij').

  ``warped(x) = source(x + displacement(x))``, ``[B, *S, C]``. ``impl='gather'`` (one row gather
  of ``C``-vectors per interpolation corner) is the default because its forward+backward is
  several times faster than the reference path ``'map_coordinates'`` (per-channel
  ``jax.scipy.ndimage.map_coordinates``, same result) at the ImgFeatAlign feature-map sizes
  (``python -m benchmarks.warp``; figures in ``benchmarks/RESULTS.md``).
  """
  if impl not in ("gather", "map_coordinates"):
    raise ValueError(f"warp impl must be 'gather' or 'map_coordinates', got {impl!r}")
  return sample(
    source, _warp_coordinates(source, displacement), order=order, padding=padding, impl=impl
  )


# ----------------------------------------------------------------------------- displacement algebra


def resize_displacement(
  displacement: jax.Array, size: Sequence[int], *, align_corners: bool = False
) -> jax.Array:
  """Resizes a pixel displacement ``[B, *S, n]`` to ``[B, *size, n]`` and rescales its values.

  The field is resampled (bi/trilinear) and each component is multiplied by the ratio of grid
  spacings along its own axis, so the result is in pixels of the new grid.

  Args:
    displacement: ``[B, H, W, 2]`` or ``[B, D, H, W, 3]``, pixels, 'ij'.
    size: the new spatial shape, ``(h, w)`` or ``(d, h, w)``.
    align_corners: ``False`` (default): pixel *edges* of both grids coincide (half-pixel centres,
      as ``jax.image.resize``), values scale by ``new / old``. ``True``: the corner pixel
      *centres* coincide (ICON's unit convention), values scale by ``(new - 1) / (old - 1)``.
  """
  num_axes = displacement.ndim - 2
  if num_axes not in (2, 3) or displacement.shape[-1] != num_axes or len(size) != num_axes:
    raise ValueError(
      f"expected displacement [B, *S, n] with n = len(S) = len(size) in (2, 3), "
      f"got displacement {displacement.shape} and size {tuple(size)}"
    )
  old = displacement.shape[1:-1]
  size = tuple(int(s) for s in size)
  if align_corners:
    scale = [(new - 1) / (prev - 1) if prev > 1 else 1.0 for new, prev in zip(size, old)]
    coords = jnp.stack(
      jnp.meshgrid(
        *[
          jnp.linspace(0.0, prev - 1.0, new, dtype=displacement.dtype)
          for new, prev in zip(size, old)
        ],
        indexing="ij",
      ),
      axis=-1,
    )
    coords = jnp.broadcast_to(coords, (displacement.shape[0], *size, num_axes))
    resized = sample(displacement, coords, padding="border")
  else:
    scale = [new / prev for new, prev in zip(size, old)]
    resized = jax.image.resize(
      displacement, (displacement.shape[0], *size, num_axes), method="linear"
    )
  return resized * jnp.asarray(scale, dtype=displacement.dtype)


def compose_displacements(
  outer: jax.Array, inner: jax.Array, *, padding: Padding = "border", impl: Impl = "gather"
) -> jax.Array:
  """Displacement of the composed map ``phi_outer ∘ phi_inner`` (inner applied first).

  With ``phi_u(x) = x + u(x)``, returns ``w(x) = inner(x) + outer(x + inner(x))`` so that
  ``phi_w = phi_outer(phi_inner(x))``. For images this means
  ``warp(warp(I, outer), inner) == warp(I, w)``: first register ``I`` by ``outer``, then the
  result by ``inner`` (ICON's TwoStepRegistration order: ``compose(first_step, second_step)``).

  Args:
    outer, inner: ``[B, *S, n]`` pixels, 'ij', on the same grid.
    padding: how ``outer`` is extended outside the grid (``'border'``, as ICON).
  Returns:
    ``[B, *S, n]`` pixels.
  """
  _check_shapes(outer, inner)
  coords = identity_map(inner.shape[1:-1], dtype=inner.dtype) + inner
  return inner + sample(outer, coords, padding=padding, impl=impl)


# ----------------------------------------------------------------------------- unit conversions


def unit_spacing(spatial_shape: Sequence[int]) -> tuple[float, ...]:
  """Per-axis size of one pixel in ICON's unit coordinates: ``1 / (N - 1)`` (1 where N = 1)."""
  return tuple(1.0 / (n - 1) if n > 1 else 1.0 for n in spatial_shape)


def pixels_to_unit(values: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Pixel coordinates or displacements ``[..., n]`` ('ij') to ICON unit ones (``p / (N-1)``).

  The map is linear with no offset, so it converts coordinates and displacements alike.
  """
  _check_last_axis(values, spatial_shape)
  return values * jnp.asarray(unit_spacing(spatial_shape), dtype=values.dtype)


def unit_to_pixels(values: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """ICON unit coordinates or displacements ``[..., n]`` ('ij') to pixels (``v * (N-1)``)."""
  _check_last_axis(values, spatial_shape)
  return values / jnp.asarray(unit_spacing(spatial_shape), dtype=values.dtype)


def pixels_to_grid_sample(
  values: jax.Array,
  spatial_shape: Sequence[int],
  *,
  align_corners: bool = True,
  displacement: bool = False,
) -> jax.Array:
  """Pixel 'ij' coordinates ``[..., n]`` to a ``grid_sample`` grid (``[-1, 1]``, 'xy' order).

  Args:
    values: ``[..., n]`` pixel coordinates ('ij'), or displacements if ``displacement``.
    spatial_shape: the grid ``values`` refer to, ``(H, W)`` or ``(D, H, W)``.
    align_corners: the ``grid_sample`` flag the result is meant for.
    displacement: convert a difference of coordinates (no offset).
  Returns:
    ``[..., n]`` with the last axis reversed ('xy' / 'xyz').
  """
  _check_last_axis(values, spatial_shape)
  sizes = jnp.asarray(spatial_shape, dtype=values.dtype)
  if align_corners:
    scale = 2.0 / jnp.maximum(sizes - 1.0, 1.0)
    offset = -1.0
  else:
    scale = 2.0 / sizes
    offset = 1.0 / sizes - 1.0
  out = values * scale if displacement else values * scale + offset
  return out[..., ::-1]


def grid_sample_to_pixels(
  grid: jax.Array,
  spatial_shape: Sequence[int],
  *,
  align_corners: bool = True,
  displacement: bool = False,
) -> jax.Array:
  """Inverse of :func:`pixels_to_grid_sample`: 'xy' ``[-1, 1]`` grid to 'ij' pixels."""
  _check_last_axis(grid, spatial_shape)
  values = grid[..., ::-1]
  sizes = jnp.asarray(spatial_shape, dtype=grid.dtype)
  if align_corners:
    scale = 2.0 / jnp.maximum(sizes - 1.0, 1.0)
    offset = -1.0
  else:
    scale = 2.0 / sizes
    offset = 1.0 / sizes - 1.0
  return values / scale if displacement else (values - offset) / scale


# ----------------------------------------------------------------------------- Jacobians


def jacobian_determinant(displacement: jax.Array, *, method: str = "central") -> jax.Array:
  """Determinant of the Jacobian of ``phi(x) = x + u(x)`` by finite differences.

  Args:
    displacement: ``[B, *S, n]`` pixels, 'ij', n = 2 or 3.
    method: ``'central'``: central differences inside, one-sided at the borders (as
      ``np.gradient``), result ``[B, *S]``. ``'forward'``: forward differences on each cell's
      corner (ICON's ``flips`` stencil), result ``[B, *(S - 1)]``.
  Returns:
    Determinants (dimensionless); exact for affine maps with either method.
  """
  num_axes = displacement.ndim - 2
  if num_axes not in (2, 3) or displacement.shape[-1] != num_axes:
    raise ValueError(
      f"expected displacement [B, H, W, 2] or [B, D, H, W, 3], got {displacement.shape}"
    )
  if method == "central":
    if min(displacement.shape[1:-1]) < 2:
      raise ValueError(f"central differences need >= 2 pixels per axis, got {displacement.shape}")
    columns = [jnp.gradient(displacement, axis=1 + axis) for axis in range(num_axes)]
  elif method == "forward":
    cell = tuple(slice(None, -1) for _ in range(num_axes))
    columns = []
    for axis in range(num_axes):
      ahead = [slice(None, -1)] * num_axes
      ahead[axis] = slice(1, None)
      columns.append(displacement[(slice(None), *ahead)] - displacement[(slice(None), *cell)])
  else:
    raise ValueError(f"method must be 'central' or 'forward', got {method!r}")
  # jac[..., i, j] = d phi_i / d x_j = delta_ij + d u_i / d x_j.
  jac = jnp.stack(columns, axis=-1) + jnp.eye(num_axes, dtype=displacement.dtype)
  return jnp.linalg.det(jac)


def count_folds(displacement: jax.Array, *, method: str = "central") -> jax.Array:
  """Number of positions per example where the map folds (Jacobian determinant < 0), ``[B]``."""
  det = jacobian_determinant(displacement, method=method)
  return jnp.sum(det < 0, axis=tuple(range(1, det.ndim)))


# ----------------------------------------------------------------------------- checks


def _check_shapes(source: jax.Array, displacement: jax.Array) -> None:
  num_axes = source.ndim - 2
  if (
    num_axes not in (2, 3) or displacement.ndim != source.ndim or displacement.shape[-1] != num_axes
  ):
    raise ValueError(
      f"expected source [B, H, W, C] / [B, D, H, W, C] and displacement "
      f"[B, H, W, 2] / [B, D, H, W, 3], got {source.shape} and "
      f"{displacement.shape}"
    )
  if source.shape[:-1] != displacement.shape[:-1]:
    raise ValueError(
      f"source {source.shape} and displacement {displacement.shape} must share "
      "[B, *S]; resize the displacement first (resize_displacement)"
    )


def _check_last_axis(values, spatial_shape):
  if values.shape[-1] != len(spatial_shape):
    raise ValueError(
      f"last axis of {values.shape} must have one entry per axis of the grid {tuple(spatial_shape)}"
    )
