"""The masked autoencoder's loss: L2 on the masked patches of the acquired contrasts only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# SelfMedMAE's per-patch normalisation epsilon (a LayerNorm without affine over a patch).
NORM_EPSILON = 1e-6


def normalized_patches(patches: jax.Array, epsilon: float = NORM_EPSILON) -> jax.Array:
  """Each patch ``[..., V]`` minus its mean over its ``V`` voxels, over ``sqrt(var + eps)``
  (SelfMedMAE's target with ``norm_pix_loss``)."""
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.var(patches, axis=-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + epsilon)


def masked_patch_loss(
  prediction: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  present: jax.Array,
  valid: jax.Array | None = None,
  *,
  normalize_target: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Mean squared error over the voxels of the masked patches of acquired contrasts.

  Every such patch weighs the same, whichever contrast and example it belongs to (so a subject
  with more contrasts has more patches in the mean).

  Args:
    prediction: ``[B, K, P, V]``; target: the true patches ``[B, K, P, V]``
      (:func:`~mammojax.nn.dynamic_tokenizer.patchify`).
    mask: ``[B, K, P]`` True where masked; present: ``[B, K]``; valid: ``[B]`` (padding
      examples 0).
    normalize_target: compare with per-patch normalised targets (:func:`normalized_patches`).
  Returns:
    ``(loss, number of patches in it)``; the loss is 0 when there are none.
  """
  target = target.astype(jnp.float32)
  if normalize_target:
    target = normalized_patches(target)
  per_patch = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=-1)
  weight = mask.astype(jnp.float32) * (jnp.asarray(present) > 0)[..., None].astype(jnp.float32)
  if valid is not None:
    weight = weight * jnp.asarray(valid, jnp.float32)[:, None, None]
  count = jnp.sum(weight)
  return jnp.sum(per_patch * weight) / jnp.maximum(count, 1.0), count
