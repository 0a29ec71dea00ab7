"""UNETR (Hatamizadeh et al. 2022) as MONAI's ``monai.networks.nets.UNETR``, channels-last, N-d.

``[B, *S, C_in] -> [B, *S, out_channels]`` logits, ``S`` 3D (``[B, D, H, W, C]``) or 2D; every
side a multiple of the fixed patch size 16. Layout (MONAI names in brackets, ``f`` =
``feature_size``, ``g = S / 16`` the patch grid):

* ``vit`` (``vit``): :class:`~mammojax.nn.vit.VisionTransformer` with 12 pre-norm blocks, no
  class token, a learned position embedding, LayerNorm eps 1e-5 and no query/key/value biases
  (MONAI's ``qkv_bias=False``); its block outputs 3, 6, 9 and its final normed tokens are
  reshaped row-major to ``[B, *g, hidden_size]`` (MONAI's ``proj_feat``);
* ``encoder1`` (:class:`~mammojax.nn.unet_blocks.UnetrBasicBlock`) on the input, ``f``
  channels at full resolution;
* ``encoder2`` / ``encoder3`` / ``encoder4`` (``UnetrPrUpBlock`` with 2 / 1 / 0 extra layers) on
  block outputs 3 / 6 / 9: ``2f`` at ``8g``, ``4f`` at ``4g``, ``8f`` at ``2g``;
* ``decoder5`` .. ``decoder2`` (``UnetrUpBlock``): up-sample, concatenate the encoder map of
  the same resolution, conv block: ``8f`` at ``2g`` .. ``f`` at ``16g``;
* ``out`` (``UnetOutBlock``): 1x1 conv with a bias.

Parameter names match MONAI's keys as :mod:`mammojax.nn.unet_blocks` and
:mod:`mammojax.convert.unetr` describe. MONAI 1.6's ``TransformerBlock`` also builds a
``norm_cross_attn`` LayerNorm per block that its forward pass never uses (no cross-attention);
this model has no such parameters. The full-size model (``in_channels=1``, ``out_channels=14``,
96^3, defaults) has 92,784,046 parameters, MONAI's 92,802,478 less the 12 x 2 x 768 = 18,432
unused ``norm_cross_attn`` ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn.unet_blocks import (
  UnetOutBlock,
  UnetrBasicBlock,
  UnetrPrUpBlock,
  UnetrUpBlock,
  check_input_sides,
)
from mammojax.nn.vit import VisionTransformer

# Fixed by MONAI's UNETR (patch_size = 16 on every axis, 12 blocks tapped at 3, 6 and 9).
PATCH_SIZE = 16
NUM_LAYERS = 12
TAPPED_BLOCKS = (3, 6, 9)
# torch's LayerNorm default, which MONAI's ViT keeps.
LAYER_NORM_EPSILON = 1e-5


class UNETR(nn.Module):
  """MONAI UNETR: ``[B, *S, C_in] -> [B, *S, out_channels]`` (see the module docstring).

  Attributes:
    out_channels: logits per voxel.
    img_size: the input sides the position embedding is built for: an int (the same on every
      spatial axis of the input) or one per axis; multiples of 16.
    feature_size: ``f``, the channels of the full-resolution stage (MONAI 16).
    hidden_size: ViT token width (768).
    mlp_dim: ViT MLP width (3072).
    num_heads: ViT attention heads (12).
    norm_name: the conv blocks' norm, ``'instance'`` (without affine parameters).
    conv_block: conv blocks after the extra up-samplings of ``encoder2`` / ``encoder3``.
    res_block: residual conv blocks (else two plain convs).
    dropout_rate: ViT dropout, also on the attention weights as MONAI's ``SABlock``.
    qkv_bias: biases on the ViT query/key/value projections (MONAI: False).
    remat: recompute each ViT block in the backward pass (memory for 3-D token counts).
    dtype: computation dtype (norm statistics in float32).
  """

  out_channels: int
  img_size: int | Sequence[int]
  feature_size: int = 16
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  norm_name: str = "instance"
  conv_block: bool = True
  res_block: bool = True
  dropout_rate: float = 0.0
  qkv_bias: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  def image_sides(self, num_spatial_dims: int) -> tuple[int, ...]:
    """``img_size`` as one side per spatial axis."""
    if isinstance(self.img_size, int):
      return (self.img_size,) * num_spatial_dims
    sides = tuple(int(side) for side in self.img_size)
    if len(sides) != num_spatial_dims:
      raise ValueError(
        f"UNETR img_size={sides} has {len(sides)} sides but the input has {num_spatial_dims} "
        "spatial axes"
      )
    return sides

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args:
      x: ``[B, *S, C_in]`` with ``S`` equal to ``img_size`` (multiples of 16).
      train: dropout on (needs a ``'dropout'`` rng when ``dropout_rate > 0``).
    Returns:
      ``[B, *S, out_channels]`` logits.
    """
    check_input_sides(
      x.shape,
      PATCH_SIZE,
      "UNETR",
      "Pad or crop the volume to such sides, or run it through a sliding-window inferer "
      "(monai.inferers.SlidingWindowInferer) with roi_size = img_size.",
    )
    n = x.ndim - 2
    spatial = tuple(x.shape[1:-1])
    sides = self.image_sides(n)
    if spatial != sides:
      raise ValueError(
        f"UNETR: input of shape {x.shape} has spatial sides {spatial}, but the model was built "
        f"for img_size={sides} (its position embedding holds that patch grid); resize, pad or "
        "crop to it, or use a sliding-window inferer with roi_size = img_size"
      )
    tokens, hidden_states = VisionTransformer(
      image_size=sides,
      patch_size=PATCH_SIZE,
      hidden_dim=self.hidden_size,
      depth=NUM_LAYERS,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      num_classes=0,
      class_token=False,
      layer_norm_epsilon=LAYER_NORM_EPSILON,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.dropout_rate,
      dtype=self.dtype,
      repeat_grayscale=False,
      position_embedding="learned",
      qkv_bias=self.qkv_bias,
      remat=self.remat,
      name="vit",
    )(x, train=train, return_tokens=True)
    grid = tuple(side // PATCH_SIZE for side in spatial)
    to_grid = lambda t: t.reshape(t.shape[0], *grid, self.hidden_size)
    enc1 = UnetrBasicBlock(
      self.feature_size,
      3,
      1,
      res_block=self.res_block,
      norm=self.norm_name,
      dtype=self.dtype,
      name="encoder1",
    )(x)
    return unetr_decoder(
      enc1,
      tuple(to_grid(hidden_states[i]) for i in TAPPED_BLOCKS),
      to_grid(tokens),
      out_channels=self.out_channels,
      feature_size=self.feature_size,
      norm_name=self.norm_name,
      conv_block=self.conv_block,
      res_block=self.res_block,
      dtype=self.dtype,
    )


def unetr_decoder(
  enc1: jax.Array,
  taps: tuple[jax.Array, jax.Array, jax.Array],
  final: jax.Array,
  *,
  out_channels: int,
  feature_size: int,
  norm_name: str = "instance",
  conv_block: bool = True,
  res_block: bool = True,
  dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """UNETR's decoder head, from the full-resolution map and the ViT's token grids to logits.

  Call it inside a compact method: ``encoder2`` .. ``encoder4``, ``decoder5`` .. ``decoder2``
  and ``out`` are created in the calling module (MONAI's names), so UNETR and the adaptive
  UNETR of AMAE share the layout and the converter.

  Args:
    enc1: ``[B, *S, f]``, ``encoder1``'s output at full resolution (``f = feature_size``).
    taps: block outputs 3, 6 and 9 as grids ``[B, *g, E]`` (``g = S / 16``).
    final: the normed final tokens as a grid ``[B, *g, E]``.
  Returns:
    ``[B, *S, out_channels]`` logits.
  """
  f = feature_size
  blocks = dict(norm=norm_name, dtype=dtype)
  up = dict(
    kernel_size=3,
    strides=1,
    upsample_kernel_size=2,
    conv_block=conv_block,
    res_block=res_block,
    **blocks,
  )
  first, second, third = taps
  enc2 = UnetrPrUpBlock(2 * f, num_layer=2, **up, name="encoder2")(first)
  enc3 = UnetrPrUpBlock(4 * f, num_layer=1, **up, name="encoder3")(second)
  enc4 = UnetrPrUpBlock(8 * f, num_layer=0, **up, name="encoder4")(third)
  decoder = dict(kernel_size=3, upsample_kernel_size=2, res_block=res_block, **blocks)
  dec3 = UnetrUpBlock(8 * f, **decoder, name="decoder5")(final, enc4)
  dec2 = UnetrUpBlock(4 * f, **decoder, name="decoder4")(dec3, enc3)
  dec1 = UnetrUpBlock(2 * f, **decoder, name="decoder3")(dec2, enc2)
  out = UnetrUpBlock(f, **decoder, name="decoder2")(dec1, enc1)
  return UnetOutBlock(out_channels, dtype=dtype, name="out")(out)
