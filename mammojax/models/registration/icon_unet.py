"""ICON's ``UNet2`` displacement network (``tallUNet2``, GradICON / uniGradICON), 2D or 3D.

Matches ``icon_registration.networks.UNet2`` layer for layer so its torch weights import
exactly (``mammojax.convert.icon``), BatchNorm included (running statistics in
``batch_stats``; ``train=True`` normalises with batch statistics and updates them, as torch's
training mode).

Level ``d`` of the encoder: ``x <- conv3/stride2(leaky_relu(x)) + pad_or_crop(avgpool2(x))``.
Level ``d`` of the decoder (deepest first): ``x <- convT4/stride2(leaky_relu(x)) +
upsample2(pad_or_crop(x))``, BatchNorm, crop to the skip's size, concatenate the skip. A
zero-initialised 3-conv gives the displacement, divided by 10. ``pad_or_crop`` keeps the first
channels or zero-pads channels at the front. Output: ``[B, *S, n]`` in ICON unit coordinates
('ij', ``[0, 1]`` per axis over the grid), for :class:`~.icon.FunctionFromVectorField`.

Submodule names follow the torch attributes (``downConvs_0``, ``upConvs_0``, ``batchNorms_0``,
``lastConv``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.models.registration.icon import check_image_pair
from mammojax.nn import partitioning
from mammojax.nn.resize import avg_pool_half, upsample

# tallUNet2 with one input channel per image (uniGradICON, GradICON 2D/3D).
TALL_DOWN_FEATURES = (2, 16, 32, 64, 256, 512)
TALL_UP_FEATURES = (16, 32, 64, 128, 256)


def _kernel_init(num_spatial: int, zero: bool = False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
  return partitioning.conv_kernel_init(init, num_spatial)


class ICONUNet2(nn.Module):
  """``UNet2(num_layers, [down_features, up_features], dimension)`` of ICON.

  Attributes:
    down_features: input channels (``2 * C`` for a pair of ``C``-channel images) then the
      encoder widths; ``len = num_layers + 1`` (tallUNet2: 2, 16, 32, 64, 256, 512).
    up_features: decoder widths, ``len = num_layers`` (tallUNet2: 16, 32, 64, 128, 256).
    train: BatchNorm uses (and updates) batch statistics; else running averages.
    activation: before every down and up convolution (ICON: LeakyReLU, slope 0.01).
  Returns (``__call__``): ``[B, *S, n]`` displacement in ICON unit coordinates.
  """

  down_features: Sequence[int] = TALL_DOWN_FEATURES
  up_features: Sequence[int] = TALL_UP_FEATURES
  train: bool = False
  activation: Callable[[jax.Array], jax.Array] = nn.leaky_relu

  @nn.compact
  def __call__(self, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    check_image_pair(moving, fixed)
    num_spatial = moving.ndim - 2
    num_layers = len(self.up_features)
    if len(self.down_features) != num_layers + 1:
      raise ValueError(
        f"down_features {tuple(self.down_features)} needs one more entry (the "
        f"input channels) than up_features {tuple(self.up_features)}"
      )
    x = jnp.concatenate([moving, fixed], axis=-1)
    if x.shape[-1] != self.down_features[0]:
      raise ValueError(
        f"the network takes {self.down_features[0]} input channels (moving and "
        f"fixed concatenated), got images {moving.shape}"
      )
    same3 = ((1, 1),) * num_spatial
    skips = []
    for depth in range(num_layers):
      skips.append(x)
      y = nn.Conv(
        self.down_features[depth + 1],
        (3,) * num_spatial,
        strides=(2,) * num_spatial,
        padding=same3,
        kernel_init=_kernel_init(num_spatial),
        name=f"downConvs_{depth}",
      )(self.activation(x))
      x = y + _pad_or_crop_channels(avg_pool_half(x), y.shape[-1])
    for depth in reversed(range(num_layers)):
      # torch ConvTranspose(k=4, s=2, p=1) == conv of the stride-dilated input padded by
      # k - 1 - p = 2 with the spatially flipped kernel (the importer flips it).
      y = nn.ConvTranspose(
        self.up_features[depth],
        (4,) * num_spatial,
        strides=(2,) * num_spatial,
        padding=((2, 2),) * num_spatial,
        kernel_init=_kernel_init(num_spatial),
        name=f"upConvs_{depth}",
      )(self.activation(x))
      residual = _pad_or_crop_channels(x, y.shape[-1])
      # F.interpolate(scale_factor=2, align_corners=False); y is exactly twice x's size.
      x = y + upsample(residual, 2, "linear")
      x = nn.BatchNorm(
        use_running_average=not self.train, momentum=0.9, epsilon=1e-5, name=f"batchNorms_{depth}"
      )(x)
      skip = skips[depth]
      x = x[(slice(None), *[slice(0, n) for n in skip.shape[1:-1]])]
      x = jnp.concatenate([x, skip], axis=-1)
    out = nn.Conv(
      num_spatial,
      (3,) * num_spatial,
      padding=same3,
      kernel_init=_kernel_init(num_spatial, zero=True),
      name="lastConv",
    )(x)
    return out / 10.0


def _pad_or_crop_channels(x: jax.Array, channels: int) -> jax.Array:
  """The first ``channels`` channels of ``x``, zero-padded at the front if it has fewer."""
  x = x[..., :channels]
  missing = channels - x.shape[-1]
  if missing > 0:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(missing, 0)])
  return x
