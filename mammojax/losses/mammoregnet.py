"""MammoRegNet's published training loss (Longitudinal_Mammogram_Alignment): NCC of the fixed
image with the affine-only and the fully warped moving image, forward-difference smoothness and a
penalty on negative Jacobian determinants."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mammojax.losses.similarity import check_same_shape
from mammojax.nn import warp as warp_lib


def mammoregnet_ncc(a: jax.Array, b: jax.Array) -> jax.Array:
  """MammoRegNet's NCC: Pearson correlation over *all* elements of the two tensors (the whole
  batch at once), unbiased std plus 1e-8, sum divided by ``numel - 1``; NaN becomes 0."""
  check_same_shape(a, b)
  count = a.size

  def standardise(x):
    return (x - jnp.mean(x)) / (jnp.std(x, ddof=1) + 1e-8)

  value = jnp.sum(standardise(a) * standardise(b)) / (count - 1)
  return jnp.where(jnp.isnan(value), 0.0, value)


def mammoregnet_loss(
  fixed: jax.Array,
  warped: jax.Array,
  affine_warped: jax.Array,
  displacement: jax.Array,
  *,
  regularity_weight: float = 1.0,
  jacobian_weight: float = 1e-5,
  reference_jacobian: bool = False,
) -> dict[str, jax.Array]:
  """The published MammoRegNet training loss (Longitudinal_Mammogram_Alignment).

  ``(1 - NCC(fixed, affine_warped)) + (1 - NCC(fixed, warped))
  + regularity_weight * (smoothness + jacobian_weight * sum(relu(-det J)))`` where smoothness is
  ``0.5 * (mean(du/dx**2) + mean(du/dy**2))`` (forward differences, both components) and
  ``det J`` the forward-difference Jacobian determinant of ``x + u`` on each cell, summed (not
  averaged) over the batch.

  Args:
    fixed, warped, affine_warped: ``[B, H, W, C]``: the fixed image, the moving image warped by
      the full (affine + deformable) field and by the affine part alone.
    displacement: the full field ``[B, H, W, 2]`` in pixels, 'ij'.
    regularity_weight: ``lambda_regu`` (1.0 in the reference training script).
    jacobian_weight: the NJD ``Lambda`` (1e-5 in the reference).
    reference_jacobian: reproduce the reference's determinant, which pairs channel 0 with the
      column derivative (correct for 'xy' fields, wrong for MammoRegNet's own 'ij' flow).
      Default: the geometrically right determinant for 'ij'.
  Returns:
    ``{'loss', 'ncc', 'ncc_affine', 'similarity', 'smoothness', 'negative_jacobian',
    'regularity'}``; ``negative_jacobian`` is the unweighted ``sum(relu(-det J))``.
  """
  if getattr(displacement, "ndim", None) != 4 or displacement.shape[-1] != 2:
    raise ValueError(
      f"mammoregnet_loss is 2D: displacement must be [B, H, W, 2], got {displacement.shape}"
    )
  ncc_final = mammoregnet_ncc(fixed, warped)
  ncc_affine = mammoregnet_ncc(fixed, affine_warped)
  similarity = (1.0 - ncc_affine) + (1.0 - ncc_final)
  d_rows = displacement[:, 1:, :, :] - displacement[:, :-1, :, :]
  d_cols = displacement[:, :, 1:, :] - displacement[:, :, :-1, :]
  smoothness = 0.5 * (jnp.mean(jnp.square(d_cols)) + jnp.mean(jnp.square(d_rows)))
  if reference_jacobian:
    down = displacement[:, 1:, :-1] - displacement[:, :-1, :-1]
    right = displacement[:, :-1, 1:] - displacement[:, :-1, :-1]
    det = (right[..., 0] + 1) * (down[..., 1] + 1) - right[..., 1] * down[..., 0]
  else:
    det = warp_lib.jacobian_determinant(displacement, method="forward")
  negative_jacobian = jnp.sum(jax.nn.relu(-det))
  regularity = smoothness + jacobian_weight * negative_jacobian
  return {
    "loss": similarity + regularity_weight * regularity,
    "ncc": ncc_final,
    "ncc_affine": ncc_affine,
    "similarity": similarity,
    "smoothness": smoothness,
    "negative_jacobian": negative_jacobian,
    "regularity": regularity,
  }
