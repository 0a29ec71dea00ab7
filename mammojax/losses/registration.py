"""Registration losses on plain arrays: regularity, inverse consistency, ICON / GradICON.

Images are ``[B, *S, C]`` (2D or 3D), displacements ``[B, *S, n]`` in pixels ('ij', see
``mammojax/nn/warp.py``); a displacement ``u`` stands for the map ``phi(x) = x + u(x)`` and the
warped moving image is ``moving(phi(x))``. Image similarities live in
``mammojax.losses.similarity``; they are losses (lower is better).

The inverse-consistency functions also accept, instead of a displacement array, a transform
(a function from pixel coordinates ``[B, *Q, n]`` to pixel coordinates, as
``mammojax.models.registration.icon`` builds); multi-step transforms are then evaluated exactly
rather than through their interpolated displacement.

Units: the regularisers take pixel displacements and, by default (``convention='icon'``),
return icon_registration's numbers for the same field (unit coordinates, its own scale factors),
so ICON's ``lmbda`` values carry over unchanged; ``convention='pixel'`` gives plain pixel finite
differences (see :func:`diffusion_regularity`). GradICON's term is dimensionless, so its weight
carries over as is. ICON's inverse-consistency error and transform magnitude are lengths
squared: pass ``spacing=warp.unit_spacing(S)`` to get ICON's numbers, the default ``None`` gives
pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from mammojax.losses.similarity import Similarity, check_same_shape, ssd_loss
from mammojax.nn import warp as warp_lib

Transform = Callable[[jax.Array], jax.Array]
FieldOrTransform = jax.Array | Transform


# ----------------------------------------------------------------------------- regularity


# 'icon': icon_registration's definitions (unit coordinates, its scale factors);
# 'pixel': plain finite differences of the pixel displacement.
REGULARITY_CONVENTIONS = ("icon", "pixel")


def diffusion_regularity(displacement: jax.Array, *, convention: str = "icon") -> jax.Array:
  """Diffusion regulariser: squared forward differences of the displacement.

  ``convention='icon'`` (default) is icon_registration's ``DiffusionRegularizedNet``
  (``src/icon_registration/losses.py``, ``compute_bending_energy_loss``): on
  ``v = identity_map - phi_AB(identity_map)`` (``[B, n, *S]``, unit coordinates),
  ``(sum_d mean((v[.., x + e_d] - v[.., x])**2)) * identity_map.shape[2]**2``, each mean over
  the whole difference tensor (examples, components, positions). Its identity map
  (``network_wrappers.RegistrationModule.assign_identity_map``) has channel ``c`` along spatial
  axis ``c`` with spacing ``1 / (S_c - 1)``, so with ``u`` in pixels this is

    ``S_0**2 * sum_d mean_{b, x, c}((u_c(x + e_d) - u_c(x)) / (S_c - 1))**2``,

  ``S_0`` the *first* spatial size for every axis (ICON's choice; on a square ``N`` grid the
  factor is ``(N / (N - 1))**2`` times the pixel value, 1.075 at 28 pixels).

  ``convention='pixel'``: ``sum_d mean((u(x + e_d) - u(x))**2)`` in pixels (no size factor).

  Args:
    displacement: ``[B, *S, n]`` pixels, 'ij'.
    convention: one of ``REGULARITY_CONVENTIONS``.
  Returns:
    Scalar (dimensionless).
  """
  _check_displacement(displacement)
  _check_convention(convention)
  spatial = displacement.shape[1:-1]
  field = displacement
  if convention == "icon":
    field = warp_lib.pixels_to_unit(displacement, spatial)
  total = 0.0
  for axis in range(1, displacement.ndim - 1):
    total = total + jnp.mean(jnp.square(jnp.diff(field, axis=axis)))
  return total * spatial[0] ** 2 if convention == "icon" else total


def bending_energy(displacement: jax.Array, *, convention: str = "icon") -> jax.Array:
  """Bending energy ``(sum_i mean(u_ii**2) + 2 sum_{i<j} mean(u_ij**2)) / n**2``.

  Central second differences ``u_ii = u(x+e_i) - 2u(x) + u(x-e_i)`` and ``u_ij = (u(x+e_i+e_j)
  + u(x-e_i-e_j) - u(x+e_i-e_j) - u(x-e_i+e_j)) / 4``, means over examples, components and
  positions.

  ``convention='icon'`` (default) is icon_registration's ``BendingEnergyNet``
  (``src/icon_registration/losses.py``, ``compute_bending_energy_loss``): the field in unit
  coordinates (component ``c`` times ``s_c = 1 / (S_c - 1)``), ``u_ii`` divided by ``s_i**2``
  and ``u_ij`` by ``s_i * s_j``, each term's mean over the positions where *its own* stencil
  fits (one pixel trimmed at both ends of axes ``i`` (and ``j``) only). On a square ``N`` grid
  that is about ``(N - 1)**2`` times the pixel value.

  ``convention='pixel'``: pixel units (pixels^-2), every term on the interior positions (one
  pixel trimmed along every axis).

  Args:
    displacement: ``[B, *S, n]`` pixels (every spatial axis needs >= 3 pixels).
    convention: one of ``REGULARITY_CONVENTIONS``.
  Returns:
    Scalar.
  """
  _check_displacement(displacement)
  _check_convention(convention)
  spatial = displacement.shape[1:-1]
  num_axes = len(spatial)
  if min(spatial) < 3:
    raise ValueError(f"bending_energy needs >= 3 pixels per axis, got {displacement.shape}")
  icon = convention == "icon"
  spacing = warp_lib.unit_spacing(spatial) if icon else (1.0,) * num_axes
  field = warp_lib.pixels_to_unit(displacement, spatial) if icon else displacement

  def shifted(offsets, trimmed):  # u(x + offsets) on the positions where the stencil fits
    index = [slice(None)]
    for axis, side in enumerate(spatial):
      step = offsets.get(axis, 0)
      index.append(slice(1 + step, side - 1 + step) if axis in trimmed else slice(None))
    return field[tuple(index)]

  energy = 0.0
  for i in range(num_axes):
    trimmed = {i} if icon else set(range(num_axes))
    second = shifted({i: 1}, trimmed) - 2 * shifted({}, trimmed) + shifted({i: -1}, trimmed)
    energy = energy + jnp.mean(jnp.square(second / spacing[i] ** 2))
    for j in range(i + 1, num_axes):
      trimmed = {i, j} if icon else set(range(num_axes))
      mixed = (
        shifted({i: 1, j: 1}, trimmed)
        + shifted({i: -1, j: -1}, trimmed)
        - shifted({i: 1, j: -1}, trimmed)
        - shifted({i: -1, j: 1}, trimmed)
      ) / (4.0 * spacing[i] * spacing[j])
      energy = energy + 2.0 * jnp.mean(jnp.square(mixed))
  return energy / num_axes**2


# ----------------------------------------------------------------------------- inverse consistency


def inverse_consistency(
  phi_ab: FieldOrTransform,
  phi_ba: FieldOrTransform,
  key: jax.Array,
  spatial_shape: Sequence[int],
  *,
  noise: float = 1.0,
  spacing: Sequence[float] | None = None,
  batch_size: int | None = None,
) -> jax.Array:
  """ICON's inverse-consistency penalty on grid points jittered by Gaussian noise.

  With ``x = grid + noise * N(0, 1)`` (pixels),
  ``mean(|x - phi_ab(phi_ba(x))|^2) + mean(|x - phi_ba(phi_ab(x))|^2)``, means over examples,
  points and components.

  Args:
    phi_ab, phi_ba: displacements ``[B, *S, n]`` (pixels; interpolated with border padding) or
      transforms on pixel coordinates.
    key: PRNG key for the jitter.
    spatial_shape: ``S``, the grid the transforms act on.
    noise: jitter std in pixels (ICON: ``1 / W`` in unit coordinates, about one pixel).
    spacing: per-axis factor on errors (e.g. ``warp.unit_spacing(S)`` for ICON's units).
    batch_size: needed only when both maps are transforms.
  Returns:
    Scalar; 0 when the maps are exact inverses of each other at the sampled points.
  """
  f, g = _as_transform(phi_ab), _as_transform(phi_ba)
  points = _jittered_grid(
    key, _batch_of(batch_size, phi_ab, phi_ba), spatial_shape, noise, stride=1
  )
  scale = _spacing_array(spacing, spatial_shape)
  error_ab = (points - f(g(points))) * scale
  error_ba = (points - g(f(points))) * scale
  return jnp.mean(jnp.square(error_ab)) + jnp.mean(jnp.square(error_ba))


def gradient_inverse_consistency(
  phi_ab: FieldOrTransform,
  phi_ba: FieldOrTransform,
  key: jax.Array,
  spatial_shape: Sequence[int],
  *,
  noise: float = 1.0,
  stride: int = 1,
  delta: float = 0.01,
  spacing: Sequence[float] | None = None,
  batch_size: int | None = None,
) -> jax.Array:
  """GradICON: squared Frobenius norm of the Jacobian of ``x - phi_ab(phi_ba(x))``.

  The Jacobian is estimated by forward differences of step ``delta`` pixels along each axis at
  jittered grid points (one direction, ``phi_ab ∘ phi_ba``, as ICON's ``GradientICON``):
  ``sum_d mean(((e(x) - e(x + delta e_d)) / delta)**2)``.

  Args:
    phi_ab, phi_ba: displacements ``[B, *S, n]`` (pixels) or transforms on pixel coordinates.
    key: PRNG key for the jitter.
    spatial_shape: ``S``.
    noise: jitter std in pixels.
    stride: keep every ``stride``-th grid point per axis (ICON's sparse variant: 2, with
      ``noise=2``).
    delta: finite-difference step in pixels.
    spacing: per-axis unit lengths (errors scale by it, steps by their own axis's entry).
    batch_size: needed only when both maps are transforms.
  Returns:
    Scalar, dimensionless; 0 when the composition is locally a translation.
  """
  f, g = _as_transform(phi_ab), _as_transform(phi_ba)
  points = _jittered_grid(key, _batch_of(batch_size, phi_ab, phi_ba), spatial_shape, noise, stride)
  scale = _spacing_array(spacing, spatial_shape)
  error = (points - f(g(points))) * scale
  total = 0.0
  for axis in range(len(spatial_shape)):
    step = jnp.zeros((len(spatial_shape),), points.dtype).at[axis].set(delta)
    moved = points + step
    error_moved = (moved - f(g(moved))) * scale
    total = total + jnp.mean(jnp.square((error - error_moved) / (delta * scale[axis])))
  return total


# ----------------------------------------------------------------------------- loss wrappers


def icon_loss(
  moving: jax.Array,
  fixed: jax.Array,
  phi_ab: FieldOrTransform,
  phi_ba: FieldOrTransform,
  key: jax.Array,
  *,
  lmbda: float,
  similarity: Similarity = ssd_loss,
  noise: float = 1.0,
  spacing: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
  """ICON (``InverseConsistentNet``): symmetric similarity + ``lmbda`` * inverse consistency.

  Args:
    moving, fixed: images A and B, ``[B, *S, C]``.
    phi_ab: registers A to B (``A(phi_ab(x)) ~= B(x)``); displacement ``[B, *S, n]`` pixels or
      transform. ``phi_ba`` likewise for B to A.
    key: PRNG key for the jitter.
  Returns:
    ``{'loss', 'similarity', 'inverse_consistency', 'transform_magnitude', 'folds'}``: similarity
    ``sim(A ∘ phi_ab, B) + sim(B ∘ phi_ba, A)``; transform magnitude ``mean(u_ab**2)`` (in
    ``spacing`` units); folds: mean count per example of negative forward-difference Jacobian
    determinants of ``phi_ba`` (ICON's ``flips``), not differentiated.
  """
  consistency = inverse_consistency(
    phi_ab,
    phi_ba,
    key,
    moving.shape[1:-1],
    noise=noise,
    spacing=spacing,
    batch_size=moving.shape[0],
  )
  return _inverse_consistent_terms(
    moving, fixed, phi_ab, phi_ba, consistency, lmbda, similarity, spacing
  )


def gradicon_loss(
  moving: jax.Array,
  fixed: jax.Array,
  phi_ab: FieldOrTransform,
  phi_ba: FieldOrTransform,
  key: jax.Array,
  *,
  lmbda: float,
  similarity: Similarity = ssd_loss,
  sparse: bool = False,
  delta: float = 0.01,
  spacing: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
  """GradICON (``GradientICON`` / ``GradientICONSparse`` with ``sparse=True``).

  Dense: jitter std 1 pixel on every grid point. Sparse: jitter std 2 pixels on every second
  grid point per axis (ICON's sparse variant).

  Returns:
    ``{'loss', 'similarity', 'inverse_consistency', 'transform_magnitude', 'folds'}`` as
    :func:`icon_loss`, with the gradient inverse-consistency term.
  """
  consistency = gradient_inverse_consistency(
    phi_ab,
    phi_ba,
    key,
    moving.shape[1:-1],
    noise=2.0 if sparse else 1.0,
    stride=2 if sparse else 1,
    delta=delta,
    spacing=spacing,
    batch_size=moving.shape[0],
  )
  return _inverse_consistent_terms(
    moving, fixed, phi_ab, phi_ba, consistency, lmbda, similarity, spacing
  )


def _inverse_consistent_terms(
  moving, fixed, phi_ab, phi_ba, consistency, lmbda, similarity, spacing
):
  """The loss dict of ICON and GradICON around their (gradient) inverse-consistency term."""
  field_ab, field_ba = _as_field(phi_ab, moving), _as_field(phi_ba, moving)
  sim = _symmetric_similarity(moving, fixed, field_ab, field_ba, similarity)
  return {
    "loss": sim + lmbda * consistency,
    "similarity": sim,
    "inverse_consistency": consistency,
    "transform_magnitude": transform_magnitude(field_ab, spacing),
    "folds": _mean_folds(field_ba),
  }


def regularized_loss(
  moving: jax.Array,
  fixed: jax.Array,
  phi_ab: FieldOrTransform,
  *,
  lmbda: float,
  similarity: Similarity = ssd_loss,
  regularizer: str = "diffusion",
  convention: str = "icon",
  spacing: Sequence[float] | None = None,
) -> dict[str, jax.Array]:
  """One-way loss with a smoothness penalty (ICON's ``DiffusionRegularizedNet`` /
  ``BendingEnergyNet``): ``2 * sim(A ∘ phi_ab, B) + lmbda * regularity``.

  The factor 2 on the similarity is ICON's (it keeps ``lmbda`` comparable with the symmetric
  losses). The seed's digits demo uses SSD, diffusion and ``lmbda=0.05``; with the default
  ``convention='icon'`` the regulariser has icon_registration's value, so ``lmbda`` weighs it
  as there.

  Args:
    regularizer: ``'diffusion'`` (:func:`diffusion_regularity`) or ``'bending'``
      (:func:`bending_energy`).
    convention: the regulariser's scale, one of ``REGULARITY_CONVENTIONS``.
  Returns:
    ``{'loss', 'similarity', 'regularity', 'transform_magnitude', 'folds'}`` (folds of phi_ab).
  """
  field_ab = _as_field(phi_ab, moving)
  if regularizer == "diffusion":
    regularity = diffusion_regularity(field_ab, convention=convention)
  elif regularizer == "bending":
    regularity = bending_energy(field_ab, convention=convention)
  else:
    raise ValueError(f"regularizer must be 'diffusion' or 'bending', got {regularizer!r}")
  warped = warp_lib.warp(moving, field_ab, padding="border")
  sim = 2.0 * similarity(warped, fixed)
  return {
    "loss": sim + lmbda * regularity,
    "similarity": sim,
    "regularity": regularity,
    "transform_magnitude": transform_magnitude(field_ab, spacing),
    "folds": _mean_folds(field_ab),
  }


def transform_magnitude(
  displacement: jax.Array, spacing: Sequence[float] | None = None
) -> jax.Array:
  """``mean(u**2)`` over examples, positions and components (``spacing`` units)."""
  scale = _spacing_array(spacing, displacement.shape[1:-1])
  return jnp.mean(jnp.square(displacement * scale))


# ----------------------------------------------------------------------------- helpers


def _symmetric_similarity(moving, fixed, field_ab, field_ba, similarity):
  check_same_shape(moving, fixed)
  warped_a = warp_lib.warp(moving, field_ab, padding="border")
  warped_b = warp_lib.warp(fixed, field_ba, padding="border")
  return similarity(warped_a, fixed) + similarity(warped_b, moving)


def _mean_folds(field):
  folds = warp_lib.count_folds(jax.lax.stop_gradient(field), method="forward")
  return jnp.mean(folds.astype(jnp.float32))


def _as_transform(phi: FieldOrTransform) -> Transform:
  if callable(phi):
    return phi
  _check_displacement(phi)

  def transform(coordinates):
    return coordinates + warp_lib.sample(phi, coordinates, padding="border")

  return transform


def _as_field(phi: FieldOrTransform, image: jax.Array) -> jax.Array:
  spatial = image.shape[1:-1]
  if callable(phi):
    dtype = jnp.promote_types(image.dtype, jnp.float32)  # bfloat16 can't hold pixel indices
    grid = jnp.broadcast_to(
      warp_lib.identity_map(spatial, dtype), (image.shape[0], *spatial, len(spatial))
    )
    return phi(grid) - grid
  _check_displacement(phi)
  if phi.shape[:-1] != image.shape[:-1]:
    raise ValueError(f"displacement {phi.shape} must share [B, *S] with the images {image.shape}")
  return phi


def _batch_of(batch_size: int | None, *phis: FieldOrTransform) -> int:
  if batch_size is not None:
    return batch_size
  for phi in phis:
    if not callable(phi):
      return phi.shape[0]
  raise ValueError("both maps are transforms: pass batch_size (or a displacement array)")


def _jittered_grid(key, batch, spatial_shape, noise, stride):
  grid = warp_lib.identity_map(spatial_shape)[
    tuple(slice(None, None, stride) for _ in spatial_shape)
  ]
  grid = jnp.broadcast_to(grid, (batch, *grid.shape))
  return grid + noise * jax.random.normal(key, grid.shape, grid.dtype)


def _spacing_array(spacing, spatial_shape):
  if spacing is None:
    return jnp.ones((len(spatial_shape),), jnp.float32)
  if len(spacing) != len(spatial_shape):
    raise ValueError(f"spacing {tuple(spacing)} needs one entry per axis of {tuple(spatial_shape)}")
  return jnp.asarray(spacing, jnp.float32)


def _check_convention(convention):
  if convention not in REGULARITY_CONVENTIONS:
    raise ValueError(f"convention must be one of {REGULARITY_CONVENTIONS}, got {convention!r}")


def _check_displacement(displacement):
  if (
    not hasattr(displacement, "ndim")
    or displacement.ndim not in (4, 5)
    or displacement.shape[-1] != displacement.ndim - 2
  ):
    shape = getattr(displacement, "shape", type(displacement).__name__)
    raise ValueError(
      f"displacement must be [B, H, W, 2] or [B, D, H, W, 3] (pixels, 'ij'), got {shape}"
    )
