"""AMAE's Dynamic Convolution Tokenizer: one patch convolution, a filter per contrast.

Every contrast slot ``k`` of a vocabulary of ``K`` (AMAE's seven: ADC, TRACE, T2, GRE, SWI, T1,
FLAIR) has a modality vector, the one-hot ``e_k``. A learnable linear ``projector`` maps it to a
weight modulation ``s_w[k]`` and a bias modulation ``s_b[k]`` (``E`` each), which update one
shared patch convolution (``kernel`` ``[p, p, p, 1, E]``, ``bias`` ``[E]``; kernel = stride =
patch, output = the transformer width ``E``), so that every contrast is tokenised by its own
effective filter ``W_k``, ``b_k``. The update rule (``update``):

* ``'scale'`` (default): ``W_k = W * (1 + s_w[k])``, ``b_k = b * (1 + s_b[k])``;
* ``'moddrop'``: ``W_k = W * s_w[k]``, ``b_k = b * s_b[k]`` (ModDrop++'s controller rule);
* ``'shift'``: ``W_k = W + s_w[k]`` (added to every kernel tap of output channel ``e``),
  ``b_k = b + s_b[k]``.

Why these choices (the seed's formulas were lost; see configs/amae.py):

* The modality vector is one-hot: any fixed set of distinct vectors of length >= K spans the same
  per-contrast modulations through a linear projector, and one-hot keeps the vocabulary a config
  list.
* ModDrop++ modulates per (output, input) channel of its first convolution; here every contrast
  is a single input channel, so the modulation is per output channel. It therefore commutes with
  the patch projection: ``tokens_k = (patches_k @ W) * (1 + s_w[k]) + b_k`` is one shared matmul
  for all contrasts followed by a per-contrast scaling, not K convolutions.
* ``'scale'`` and ``'moddrop'`` span the same filters (``s = 1 + s'``); ``'scale'``'s projector
  starts at zero so every contrast starts from the shared filter and weight decay pulls the
  modulation towards it, whereas ModDrop++'s pulls ``s`` towards 0 (a dead filter). The
  ``'moddrop'`` projector starts at ``s = 1`` (zero kernel, bias one) for the same start.

Volumes are channels-last ``[B, D, H, W, K]`` (a missing contrast is a channel of zeros, as the
volume records store it); tokens come out per slot, ``[B, K, P, E]`` with ``P`` patches in the
row-major grid order of a strided convolution (:func:`patchify`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import partitioning

UPDATE_RULES = ("scale", "moddrop", "shift")
# variance_scaling(1, fan_in, truncated_normal) as the ViT's patch convolution.
_patch_init = nn.initializers.lecun_normal()


def patch_grid(sides: Sequence[int], patch_size: int, what: str = "volume") -> tuple[int, ...]:
  """The patch grid of ``sides`` (e.g. ``(6, 6, 6)`` for 96^3 at patch 16), or a ValueError
  naming ``what``, the sides and the fix when a side is not a multiple of ``patch_size``."""
  sides = tuple(int(s) for s in sides)
  if patch_size < 1 or any(s % patch_size for s in sides):
    multiple = tuple(-(-s // max(patch_size, 1)) * max(patch_size, 1) for s in sides)
    raise ValueError(
      f"{what} sides {sides} are not multiples of patch_size={patch_size}; pad or crop to "
      f"{multiple} (or choose a patch size that divides every side)"
    )
  return tuple(s // patch_size for s in sides)


def patchify(volumes: jax.Array, patch_size: int) -> jax.Array:
  """``[B, *S, K] -> [B, K, P, p^n]``: each contrast's patches, voxels row-major inside a patch,
  patches in the row-major grid order of a convolution with kernel = stride = ``patch_size``."""
  batch, spatial, slots = volumes.shape[0], volumes.shape[1:-1], volumes.shape[-1]
  grid = patch_grid(spatial, patch_size)
  n = len(spatial)
  split = [batch]
  for g in grid:
    split += [g, patch_size]
  x = volumes.reshape(*split, slots)
  # [B, g0, p, g1, p, ..., K] -> [B, K, g0, g1, ..., p, p, ...]
  order = (0, 2 * n + 1, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2))
  x = jnp.transpose(x, order)
  count = 1
  for g in grid:
    count *= g
  return x.reshape(batch, slots, count, patch_size**n)


def unpatchify(patches: jax.Array, grid: Sequence[int], patch_size: int) -> jax.Array:
  """The inverse of :func:`patchify`: ``[B, K, P, p^n] -> [B, *S, K]`` on the patch ``grid``."""
  grid = tuple(int(g) for g in grid)
  n = len(grid)
  batch, slots = patches.shape[:2]
  x = patches.reshape(batch, slots, *grid, *((patch_size,) * n))
  # [B, K, g0, g1, ..., p0, p1, ...] -> [B, g0, p0, g1, p1, ..., K]
  order = [0]
  for a in range(n):
    order += [2 + a, 2 + n + a]
  order.append(1)
  x = jnp.transpose(x, order)
  return x.reshape(batch, *(g * patch_size for g in grid), slots)


class DynamicConvTokenizer(nn.Module):
  """``[B, *S, K] -> [B, K, P, E]`` tokens, each contrast slot through its own filter (see the
  module docstring).

  Attributes:
    num_slots: ``K``, the contrast vocabulary size.
    patch_size: kernel = stride of the patch convolution.
    hidden_dim: ``E``, the token width.
    update: one of :data:`UPDATE_RULES`.
    dtype: computation dtype (parameters stay float32).
  Parameters: ``kernel`` ``[p, .., p, 1, E]`` and ``bias`` ``[E]`` (the shared convolution, a
  ViT ``conv_proj`` of one input channel), ``projector`` (Dense ``K -> 2E``: ``s_w`` then
  ``s_b``).
  """

  num_slots: int
  patch_size: int
  hidden_dim: int
  update: str = "scale"
  dtype: jnp.dtype = jnp.float32

  def _shared(self, num_spatial_dims: int) -> tuple[jax.Array, jax.Array]:
    kernel = self.param(
      "kernel",
      partitioning.conv_kernel_init(_patch_init, num_spatial_dims),
      (self.patch_size,) * num_spatial_dims + (1, self.hidden_dim),
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (self.hidden_dim,)
    )
    return kernel, bias

  @nn.compact
  def __call__(self, volumes: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """Args:
      volumes: ``[B, *S, K]``, ``K = num_slots``, every side a multiple of ``patch_size``.
      keep: optional ``[B, K, n]`` patch indices per slot: only those patches are tokenised
        (a masked autoencoder's visible ones), before the projection.
    Returns:
      ``[B, K, P, E]`` tokens (``P`` patches, row-major grid order), or ``[B, K, n, E]``.
    """
    if volumes.ndim < 4 or volumes.shape[-1] != self.num_slots:
      raise ValueError(
        f"DynamicConvTokenizer expects volumes [B, D, H, W, {self.num_slots}] (one channel per "
        f"contrast slot of the vocabulary), got {volumes.shape}"
      )
    n = volumes.ndim - 2
    if self.update not in UPDATE_RULES:
      raise ValueError(f"tokenizer update={self.update!r}; use one of {UPDATE_RULES}")
    kernel, bias = self._shared(n)
    projector = partitioning.dense(
      2 * self.hidden_dim,
      "projector",
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.ones if self.update == "moddrop" else nn.initializers.zeros,
    )
    # The projector of every slot's one-hot modality vector: [K, 2E].
    s_w, s_b = jnp.split(projector(jnp.eye(self.num_slots, dtype=jnp.float32)), 2, axis=-1)
    patches = patchify(volumes.astype(self.dtype), self.patch_size)  # [B, K, P, V]
    if keep is not None:
      patches = jnp.take_along_axis(patches, keep[..., None], axis=2)
    flat = kernel.reshape(-1, self.hidden_dim).astype(self.dtype)  # [V, E]
    projected = jnp.einsum("bkpv,ve->bkpe", patches, flat)
    s_w = s_w.astype(self.dtype)[None, :, None, :]
    if self.update == "scale":
      tokens = projected * (1.0 + s_w) + (bias * (1.0 + s_b)).astype(self.dtype)[None, :, None]
    elif self.update == "moddrop":
      tokens = projected * s_w + (bias * s_b).astype(self.dtype)[None, :, None]
    else:  # W + s: the added constant meets the sum of the patch's voxels
      voxel_sum = jnp.sum(patches, axis=-1, keepdims=True)
      tokens = projected + voxel_sum * s_w + (bias + s_b).astype(self.dtype)[None, :, None]
    return tokens


def slot_filters(params: dict, update: str = "scale") -> tuple[jax.Array, jax.Array]:
  """The effective filters of every slot from a tokenizer's parameters (``kernel``, ``bias``,
  ``projector``): ``(W_k [K, p, .., p, 1, E], b_k [K, E])``, the convolution each contrast is
  tokenised with (e.g. to build a multi-channel patch embedding from them)."""
  if update not in UPDATE_RULES:
    raise ValueError(f"tokenizer update={update!r}; use one of {UPDATE_RULES}")
  kernel, bias = jnp.asarray(params["kernel"]), jnp.asarray(params["bias"])
  projector = params["projector"]
  # A one-hot modality vector selects one row of the projector's kernel.
  s = jnp.asarray(projector["kernel"]) + jnp.asarray(projector["bias"])[None]
  s_w, s_b = jnp.split(s, 2, axis=-1)
  s_w = s_w.reshape((s.shape[0],) + (1,) * (kernel.ndim - 1) + (kernel.shape[-1],))
  if update == "scale":
    return kernel[None] * (1.0 + s_w), bias[None] * (1.0 + s_b)
  if update == "moddrop":
    return kernel[None] * s_w, bias[None] * s_b
  return kernel[None] + s_w, bias[None] + s_b
