"""AMAE's adaptive UNETR: UNETR over a variable set of contrasts.

``[B, D, H, W, K]`` volumes (one channel per slot of the contrast vocabulary, zeros where a
contrast is missing) and the presence mask ``[B, K]`` -> ``[B, D, H, W, out_channels]`` logits:

* ``encoder``: the :class:`~mammojax.models.amae.encoder.ContrastEncoder` (the pretrained MAE's,
  loaded as it is) over all ``P`` tokens of every acquired contrast, ``[B, K * P, E]``;
* at each of UNETR's skip levels (block outputs 3, 6, 9 and the normed final tokens) the
  adaptive max pool over the contrast axis ``[B, K, P, E] -> [B, P, E]``
  (:func:`~mammojax.models.amae.encoder.pool_over_contrasts`), reshaped to the patch grid;
* ``encoder1``, the convolutional path on the raw volumes, handles the contrasts the same way:
  one :class:`~mammojax.nn.unet_blocks.UnetrBasicBlock` of one input channel runs on every
  contrast separately (shared weights), and the maximum over the acquired contrasts of its
  ``f``-channel maps is the full-resolution skip; so no input channel stands for a contrast, and
  any subset works with the same weights;
* the rest is UNETR's decoder head (:func:`~mammojax.models.segmentation.unetr.unetr_decoder`,
  MONAI's names), patch 16 as in UNETR.

A missing contrast therefore changes nothing but which maxima are taken; a subject without any
acquired contrast gives zeros at every skip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.models.amae.encoder import ContrastEncoder, pool_over_contrasts
from mammojax.models.segmentation.unetr import PATCH_SIZE, TAPPED_BLOCKS, unetr_decoder
from mammojax.nn.unet_blocks import UnetrBasicBlock


class AdaptiveUNETR(nn.Module):
  """Adaptive UNETR (see the module docstring).

  Attributes:
    out_channels: logits per voxel.
    encoder: the contrast encoder (patch 16, at least 10 blocks: UNETR taps 3, 6 and 9).
    feature_size: ``f`` of the conv path and decoder (MONAI 16).
    norm_name, conv_block, res_block: UNETR's decoder options.
  """

  out_channels: int
  encoder: ContrastEncoder
  feature_size: int = 16
  norm_name: str = "instance"
  conv_block: bool = True
  res_block: bool = True

  @nn.compact
  def __call__(self, volumes: jax.Array, present: jax.Array, train: bool = False) -> jax.Array:
    """Args:
      volumes: ``[B, *image_size, K]``; present: ``[B, K]``.
      train: dropout on.
    Returns:
      ``[B, *image_size, out_channels]`` logits.
    """
    enc = self.encoder
    if enc.patch_size != PATCH_SIZE or enc.depth <= max(TAPPED_BLOCKS):
      raise ValueError(
        f"AdaptiveUNETR needs an encoder with patch_size={PATCH_SIZE} and more than "
        f"{max(TAPPED_BLOCKS)} blocks (UNETR's decoder and taps); got patch_size="
        f"{enc.patch_size}, depth={enc.depth}"
      )
    tokens, hidden_states, _ = enc(volumes, present, train=train)
    slots, grid = enc.num_slots, enc.grid

    def skip(t: jax.Array) -> jax.Array:
      pooled = pool_over_contrasts(t, present, slots)
      return pooled.reshape(pooled.shape[0], *grid, pooled.shape[-1])

    batch, spatial = volumes.shape[0], volumes.shape[1:-1]
    # Every contrast through the same one-channel block: [B, *S, K] -> [B * K, *S, 1].
    per_contrast = jnp.moveaxis(volumes, -1, 1).reshape(batch * slots, *spatial, 1)
    maps = UnetrBasicBlock(
      self.feature_size,
      3,
      1,
      res_block=self.res_block,
      norm=self.norm_name,
      dtype=enc.dtype,
      name="encoder1",
    )(per_contrast.astype(enc.dtype))
    maps = maps.reshape(batch, slots, *spatial, self.feature_size)
    acquired = (jnp.asarray(present) > 0).reshape(batch, slots, *((1,) * (len(spatial) + 1)))
    enc1 = jnp.max(jnp.where(acquired, maps, -jnp.inf), axis=1)
    enc1 = jnp.where(jnp.any(acquired, axis=1), enc1, 0).astype(maps.dtype)
    return unetr_decoder(
      enc1,
      tuple(skip(hidden_states[i]) for i in TAPPED_BLOCKS),
      skip(tokens),
      out_channels=self.out_channels,
      feature_size=self.feature_size,
      norm_name=self.norm_name,
      conv_block=self.conv_block,
      res_block=self.res_block,
      dtype=enc.dtype,
    )
