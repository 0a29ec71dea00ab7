"""ICON-style registration: transforms as functions from coordinates to coordinates.

A *transform* here is a pure function ``phi: [B, *Q, n] -> [B, *Q, n]`` on pixel coordinates of
the registration's input grid ('ij' order; see ``mammojax/nn/warp.py``). Registering a moving
image ``A`` to a fixed image ``B`` means finding ``phi`` with ``A(phi(x)) ~= B(x)``.

Registration modules are Flax linen modules that take ``(moving, fixed)`` images
``[B, *S, C]`` (2D or 3D) and

* ``module.transform(moving, fixed)`` (via ``apply(..., method='transform')``) returns ``phi``,
  a closure over arrays only, evaluable at any coordinates;
* ``module(moving, fixed)`` returns the displacement ``phi(x) - x`` on the input grid,
  ``[B, *S, n]`` in pixels; ``module(moving, fixed, coordinates)`` returns ``phi(coordinates)``.

The wrappers mirror the ICON library (uncbiag/ICON, ``network_wrappers.py``):
``FunctionFromVectorField`` turns a displacement network into a transform,
``TwoStepRegistration`` warps the moving image by the first step and registers the rest,
``DownsampleRegistration`` registers at half resolution, ``MultiStepRegistration`` chains any
number of steps. As in ICON, images are warped with border padding, and a network's displacement
output is in ICON's unit coordinates (``[0, 1]`` per axis, corner pixel centres at 0 and 1) unless
``FunctionFromVectorField.units == 'pixels'``. Passing the same module instance several times
shares its parameters (the seed's eight-step digits example, :func:`digits_registration`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.nn import partitioning
from mammojax.nn import warp as warp_lib
from mammojax.nn.fusion_barrier import computed_apart
from mammojax.nn.resize import avg_pool_half

Transform = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- pure transforms


def displacement_transform(
  displacement: jax.Array, *, padding: warp_lib.Padding = "border"
) -> DisplacementChain:
  """``phi(x) = x + u(x)`` with ``u`` interpolated (bi/trilinear) at arbitrary coordinates.

  Args:
    displacement: ``u``, ``[B, *S, n]`` pixels, 'ij'.
    padding: how ``u`` extends outside its grid (``'border'``, as ICON).
  Returns:
    ``phi``: pixel coordinates ``[B, *Q, n]`` -> pixel coordinates ``[B, *Q, n]``.
  """
  if displacement.ndim not in (4, 5) or displacement.shape[-1] != displacement.ndim - 2:
    raise ValueError(
      f"displacement must be [B, H, W, 2] or [B, D, H, W, 3], got {displacement.shape}"
    )
  return DisplacementChain((displacement,), padding)


class DisplacementChain:
  """``phi = phi_0 ∘ phi_1 ∘ ... ∘ phi_{K-1}`` with ``phi_j(x) = x + u_j(x)``, all on one grid.

  The fields ``u_j`` (pixels, 'ij'; ``u_{K-1}`` is applied to the coordinates first) are held as
  a tuple of ``[B, *S, n]`` arrays, so composing chains never copies a field. A chain is
  evaluated step by step, unrolled; each step's interpolation corners are computed in a region
  of their own (``mammojax/nn/fusion_barrier.py``), so XLA does not re-derive earlier steps
  inside later gathers (quadratic work). The VJP keeps only each step's input coordinates and
  redoes that step's interpolation on the way back: keeping every step's corners and weights
  instead grew the ICON digits train step's temporary buffer from 224 to 271 MB, and on CPU
  every byte of it is page-faulted afresh on each call (measured 10-15% slower). As a
  ``lax.scan`` over stacked fields, XLA:CPU ran the loop body several times slower than the same
  code outside a loop, and the stacked copies doubled the memory the backward pass touches.

  Attributes:
    field_list: ``K`` arrays ``[B, *S, n]``.
    padding: how each field extends outside its grid.
  """

  def __init__(self, fields: jax.Array | Sequence[jax.Array], padding: warp_lib.Padding = "border"):
    """``fields``: stacked ``[K, B, *S, n]`` or a sequence of ``K`` arrays ``[B, *S, n]``."""
    self.field_list = (
      tuple(fields)
      if not isinstance(fields, jax.Array)
      else tuple(fields[j] for j in range(fields.shape[0]))
    )
    if not self.field_list:
      raise ValueError("a DisplacementChain needs at least one field")
    self.padding = padding

  @property
  def fields(self) -> jax.Array:
    """The fields stacked, ``[K, B, *S, n]`` (a copy; for inspection)."""
    return jnp.stack(self.field_list)

  def __call__(self, coordinates: jax.Array) -> jax.Array:
    """``phi(coordinates)``: ``[B, *Q, n]`` pixel coordinates of the fields' grid."""
    return _apply_fields(self.field_list, coordinates, self.padding)

  def on_grid(self, dtype=jnp.float32) -> jax.Array:
    """``phi(x)`` at every grid point, ``[B, *S, n]``.

    The innermost field is read directly rather than interpolated: at pixel centres bilinear
    sampling returns the field's own values (and gradients), so the result is the same.
    """
    innermost = self.field_list[-1]
    grid = warp_lib.identity_map(innermost.shape[1:-1], _coordinate_dtype(dtype))
    coordinates = grid + innermost.astype(grid.dtype)
    if len(self.field_list) == 1:
      return coordinates
    return _apply_fields(self.field_list[:-1], coordinates, self.padding)

  def can_chain(self, other: object) -> bool:
    first = self.field_list[0]
    return (
      isinstance(other, DisplacementChain)
      and other.padding == self.padding
      and all(f.shape == first.shape and f.dtype == first.dtype for f in other.field_list)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _apply_fields(fields: tuple[jax.Array, ...], coordinates: jax.Array, padding: str) -> jax.Array:
  """``x <- x + u_j(x)`` for ``j = K-1, ..., 0``: K x ``[B, *S, n]``, ``[B, *Q, n]`` ->
  ``[B, *Q, n]``."""
  return _apply_fields_fwd(fields, coordinates, padding)[0]


def _apply_fields_fwd(fields, coordinates, padding):
  x = coordinates
  inputs = [None] * len(fields)
  for j in reversed(range(len(fields))):
    inputs[j] = x
    x = x + warp_lib.sample(fields[j], x, padding=padding)
  return x, (fields, tuple(inputs))


def _apply_fields_bwd(padding, residuals, cotangent):
  fields, inputs = residuals
  fields_grad = []
  grad = cotangent
  # Field 0 is applied last, so it sees the incoming cotangent first.
  for field, x in zip(fields, inputs):
    _, vjp = jax.vjp(lambda u, y: warp_lib.sample(u, y, padding=padding), field, x)
    field_grad, x_grad = vjp(grad)
    fields_grad.append(field_grad)
    grad = computed_apart(jnp.add, grad, x_grad)
  return tuple(fields_grad), grad


_apply_fields.defvjp(_apply_fields_fwd, _apply_fields_bwd)


def compose(*transforms: Transform) -> Transform:
  """``compose(f, g, h)(x) = f(g(h(x)))``: the last transform is applied to coordinates first.

  Displacement transforms on one grid compose into a single :class:`DisplacementChain`.
  """
  if not transforms:
    raise ValueError("compose needs at least one transform")
  first = transforms[0]
  if isinstance(first, DisplacementChain) and all(map(first.can_chain, transforms[1:])):
    return DisplacementChain(sum((t.field_list for t in transforms), ()), first.padding)

  def composed(coordinates: jax.Array) -> jax.Array:
    for transform in reversed(transforms):
      coordinates = transform(coordinates)
    return coordinates

  return composed


def transform_on_grid(
  transform: Transform, batch: int, spatial_shape: Sequence[int], dtype=jnp.float32
) -> jax.Array:
  """``phi(x)`` at every pixel of the grid, ``[B, *S, n]`` pixel coordinates."""
  spatial_shape = tuple(spatial_shape)
  if isinstance(transform, DisplacementChain) and transform.field_list[0].shape[:-1] == (
    batch,
    *spatial_shape,
  ):
    return transform.on_grid(dtype)
  grid = jnp.broadcast_to(
    warp_lib.identity_map(spatial_shape, _coordinate_dtype(dtype)),
    (batch, *spatial_shape, len(spatial_shape)),
  )
  return transform(grid)


def transform_to_displacement(
  transform: Transform, batch: int, spatial_shape: Sequence[int], dtype=jnp.float32
) -> jax.Array:
  """Evaluates ``transform`` on the pixel grid: ``phi(x) - x``, ``[B, *S, n]`` pixels."""
  grid = warp_lib.identity_map(spatial_shape, _coordinate_dtype(dtype))
  return transform_on_grid(transform, batch, spatial_shape, dtype) - grid


def warp_by_transform(image: jax.Array, transform: Transform) -> jax.Array:
  """``image(phi(x))`` on the image's own grid, bilinear with border padding (ICON's warp).

  Args:
    image: ``[B, *S, C]``.
    transform: pixel coordinates -> pixel coordinates of ``image``'s grid.
  """
  coordinates = transform_on_grid(transform, image.shape[0], image.shape[1:-1], image.dtype)
  return warp_lib.sample(image, coordinates, padding="border")


def _coordinate_dtype(dtype) -> jnp.dtype:
  """At least float32: bfloat16 cannot represent every pixel index above 256."""
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------- modules


class RegistrationModule(nn.Module):
  """Base of the registration modules: subclasses define ``transform(moving, fixed)``."""

  def transform(self, moving: jax.Array, fixed: jax.Array) -> Transform:
    """Returns ``phi`` with ``moving(phi(x)) ~= fixed(x)``; pixel coordinates of the input grid."""
    raise NotImplementedError(f"{type(self).__name__} must define transform(moving, fixed)")

  def __call__(
    self, moving: jax.Array, fixed: jax.Array, coordinates: jax.Array | None = None
  ) -> jax.Array:
    """Registers ``moving`` to ``fixed``.

    Args:
      moving, fixed: ``[B, *S, C]`` (``len(S)`` = 2 or 3), same shape.
      coordinates: optional ``[B, *Q, n]`` pixel coordinates ('ij') of the input grid.
    Returns:
      Without ``coordinates``: the displacement ``[B, *S, n]`` in pixels ('ij') on the input grid.
      With ``coordinates``: ``phi(coordinates)``, ``[B, *Q, n]`` pixels.
    """
    check_image_pair(moving, fixed)
    phi = self.transform(moving, fixed)
    if coordinates is not None:
      return phi(coordinates)
    return transform_to_displacement(phi, moving.shape[0], moving.shape[1:-1], moving.dtype)


class FunctionFromVectorField(RegistrationModule):
  """Wraps a network ``(moving, fixed) -> [B, *S, n]`` displacement into a transform.

  Attributes:
    net: module mapping ``(moving [B, *S, C], fixed [B, *S, C])`` to ``[B, *S, n]``, 'ij'.
    units: unit of the network's output: ``'unit'`` (ICON: ``[0, 1]`` per axis over the grid,
      the default) or ``'pixels'``.
  """

  net: nn.Module
  units: Literal["unit", "pixels"] = "unit"

  def transform(self, moving: jax.Array, fixed: jax.Array) -> Transform:
    check_image_pair(moving, fixed)
    spatial = moving.shape[1:-1]
    field = self.net(moving, fixed)
    expected = (moving.shape[0], *spatial, len(spatial))
    if field.shape != expected:
      raise ValueError(
        f"{type(self.net).__name__} returned {field.shape}; a displacement network "
        f"must return {expected} for inputs {moving.shape}"
      )
    if self.units == "unit":
      field = warp_lib.unit_to_pixels(field, spatial)
    elif self.units != "pixels":
      raise ValueError(f"units must be 'unit' or 'pixels', got {self.units!r}")
    return displacement_transform(field)


class TwoStepRegistration(RegistrationModule):
  """``first`` registers the pair, ``second`` registers the warped moving image; composed.

  ``phi = first(A, B)``, ``psi = second(A ∘ phi, B)``, result ``phi ∘ psi`` (``psi`` applied
  to coordinates first), so ``A(phi(psi(x))) ~= B(x)``. The original moving image is warped by
  ``phi``, never resampled twice.
  """

  first: RegistrationModule
  second: RegistrationModule

  def transform(self, moving: jax.Array, fixed: jax.Array) -> Transform:
    phi = self.first.transform(moving, fixed)
    psi = self.second.transform(warp_by_transform(moving, phi), fixed)
    return compose(phi, psi)


class MultiStepRegistration(RegistrationModule):
  """Any number of steps, each registering the moving image warped by all earlier steps.

  Equivalent to ``TwoStepRegistration(...TwoStepRegistration(steps[0], steps[1])..., steps[-1])``:
  the result is ``phi_0 ∘ phi_1 ∘ ... ∘ phi_{k-1}``. A module instance listed several times is
  applied several times with shared parameters.
  """

  steps: Sequence[RegistrationModule]

  def transform(self, moving: jax.Array, fixed: jax.Array) -> Transform:
    if not self.steps:
      raise ValueError("MultiStepRegistration needs at least one step")
    phi = self.steps[0].transform(moving, fixed)
    for step in self.steps[1:]:
      psi = step.transform(warp_by_transform(moving, phi), fixed)
      phi = compose(phi, psi)
    return phi


class DownsampleRegistration(RegistrationModule):
  """Runs ``net`` on both images average-pooled by 2 (ceil mode), as ICON's wrapper.

  The child's transform lives on the ``ceil(N / 2)`` grid; coordinates are carried between the
  grids in ICON's unit convention (corner pixel centres coincide), so a parent pixel ``p`` is
  child pixel ``p * (n - 1) / (N - 1)``.
  """

  net: RegistrationModule

  def transform(self, moving: jax.Array, fixed: jax.Array) -> Transform:
    check_image_pair(moving, fixed)
    spatial = moving.shape[1:-1]
    child = self.net.transform(avg_pool_half(moving), avg_pool_half(fixed))
    child_spatial = tuple(math.ceil(n / 2) for n in spatial)
    to_child = jnp.asarray(
      [(c - 1) / (n - 1) if n > 1 else 1.0 for c, n in zip(child_spatial, spatial)], moving.dtype
    )

    def phi(coordinates: jax.Array) -> jax.Array:
      return child(coordinates * to_child) / to_child

    return phi


def check_image_pair(moving: jax.Array, fixed: jax.Array) -> None:
  if moving.ndim not in (4, 5):
    raise ValueError(f"moving must be [B, H, W, C] or [B, D, H, W, C], got {moving.shape}")
  if moving.shape != fixed.shape:
    raise ValueError(
      f"moving {moving.shape} and fixed {fixed.shape} must have the same shape; "
      "resample one onto the other's grid first"
    )


# ----------------------------------------------------------------------------- networks


class DigitsMLP(nn.Module):
  """The seed's digits network: a two-hidden-layer MLP on the flattened image pair.

  ``concat(moving, fixed)`` is flattened (channels-last order), passed through
  ``Dense(hidden) -> relu -> Dense(hidden) -> relu -> Dense(H * W * n)`` whose weights and bias
  start at zero, so the untrained network outputs zero displacement (identity transform).

  Attributes:
    spatial_shape: the image grid, e.g. ``(28, 28)``.
    hidden: width of both hidden layers (50 in the seed).
    activation: after both hidden layers.
  Returns (``__call__``): displacement ``[B, *S, n]`` in ICON unit coordinates.
  """

  spatial_shape: Sequence[int] = (28, 28)
  hidden: int = 50
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    check_image_pair(moving, fixed)
    spatial = tuple(self.spatial_shape)
    if moving.shape[1:-1] != spatial:
      raise ValueError(
        f"DigitsMLP was built for images {spatial}, got {moving.shape}; set "
        "spatial_shape to the image size"
      )
    x = jnp.concatenate([moving, fixed], axis=-1).reshape(moving.shape[0], -1)
    x = self.activation(partitioning.dense(self.hidden, "dense1")(x))
    x = self.activation(partitioning.dense(self.hidden, "dense2")(x))
    size = math.prod(spatial) * len(spatial)
    x = partitioning.dense(size, "dense3", kernel_init=nn.initializers.zeros_init())(x)
    return x.reshape(moving.shape[0], *spatial, len(spatial))


def digits_registration(
  spatial_shape: Sequence[int] = (28, 28), hidden: int = 50, num_steps: int = 9
) -> MultiStepRegistration:
  """The seed's example: one :class:`DigitsMLP` step applied ``num_steps`` times, shared weights.

  The seed builds ``n = inner; 8 x: n = TwoStepRegistration(n, inner)``, i.e. nine applications
  of the same network; ``num_steps=9`` reproduces it (train with
  :func:`mammojax.losses.registration.regularized_loss`, SSD, diffusion, ``lmbda=0.05``).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  inner = FunctionFromVectorField(DigitsMLP(tuple(spatial_shape), hidden))
  return MultiStepRegistration((inner,) * num_steps)
