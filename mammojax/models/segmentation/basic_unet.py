"""MONAI's ``BasicUNet`` (``monai.networks.nets.basic_unet``), channels-last and N-d.

``[B, *S, C_in] -> [B, *S, out_channels]`` logits; the spatial axes follow the input (2D
``[B, H, W, C]``, 3D ``[B, D, H, W, C]``). Five encoder levels of ``features[0..4]`` channels
and four decoder levels back to ``features[5]``:

* ``conv_0``: :class:`TwoConv`, two ``Convolution`` units, each conv 3x3(x3) (padding 1, bias)
  -> instance norm WITH affine scale and bias (MONAI's default ``("instance", {"affine":
  True})``, eps 1e-5) -> dropout -> LeakyReLU(0.1);
* ``down_{1..4}``: :class:`Down`, max-pool 2 then a TwoConv ``convs``;
* ``upcat_{4..1}``: :class:`UpCat`, a kernel-2 stride-2 transposed conv with a bias
  (``upsample``; it halves the channels except in ``upcat_1``), the encoder skip concatenated
  BEFORE it on channels, a TwoConv ``convs``; an up-sampled map one voxel short of the skip
  (odd encoder sides) is replicate-padded at the end, as MONAI does;
* ``final_conv``: 1x1 conv with a bias.

Names, ours -> MONAI state-dict keys: ``*/conv_{j}/conv/{kernel,bias}`` ->
``*.conv_{j}.conv.{weight,bias}``, ``*/conv_{j}/norm/{scale,bias}`` ->
``*.conv_{j}.adn.N.{weight,bias}``, ``upcat_{k}/upsample/{kernel,bias}`` ->
``upcat_{k}.upsample.deconv.{weight,bias}`` (unflipped, see
:class:`~mammojax.nn.conv_blocks.TransposedConvStride2`), ``final_conv`` -> ``final_conv``; the
rest by ``/`` -> ``.``. :mod:`mammojax.convert.basic_unet` imports MONAI weights.

Input sides must be multiples of 16 (four max-pools of 2), which MONAI recommends; the model
refuses other sizes with a ``ValueError`` (MONAI itself pads its way through odd levels, which
:class:`UpCat` reproduces for direct use). At 16^3 the deepest level is one voxel, whose
instance norm is zero here and an error in torch: use 32 on at least one axis. Only
``upsample='deconv'`` and the affine instance norm are built.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn.conv_blocks import TORCH_NORM_EPS, TransposedConvStride2, instance_norm
from mammojax.nn.unet_blocks import check_input_sides, conv_layer

# MONAI BasicUNet's defaults.
DEFAULT_FEATURES = (32, 32, 64, 128, 256, 32)
NEGATIVE_SLOPE = 0.1
# Four 2x max-pools: every side must divide by 2^4.
SIZE_MULTIPLE = 16


class AffineInstanceNorm(nn.Module):
  """torch ``InstanceNorm(affine=True)``: per example and channel over ``S``, then ``scale`` and
  ``bias`` ``[C]`` (MONAI ``adn.N.weight`` / ``.bias``). ``[B, *S, C] -> [B, *S, C]``."""

  epsilon: float = TORCH_NORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *S, C]``, statistics in float32."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    y = instance_norm(x.astype(jnp.float32), self.epsilon) * scale + bias
    return y.astype(x.dtype)


class ConvNormDropAct(nn.Module):
  """MONAI ``Convolution`` with ADN ordering ``NDA``: conv (3, padding 1) -> affine instance norm
  -> dropout -> LeakyReLU. ``[B, *S, C_in] -> [B, *S, features]``. Submodules ``conv``, ``norm``.
  """

  features: int
  use_bias: bool = True
  dropout_rate: float = 0.0
  negative_slope: float = NEGATIVE_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``[B, *S, C_in]`` -> ``[B, *S, features]``; ``train`` turns dropout on."""
    n = x.ndim - 2
    x = conv_layer(self.features, 3, 1, n, use_bias=self.use_bias, name="conv", dtype=self.dtype)(x)
    x = AffineInstanceNorm(name="norm")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.leaky_relu(x, self.negative_slope)


class TwoConv(nn.Module):
  """Two :class:`ConvNormDropAct` units ``conv_0``, ``conv_1``: ``[B, *S, C] -> [B, *S, F]``."""

  features: int
  use_bias: bool = True
  dropout_rate: float = 0.0
  negative_slope: float = NEGATIVE_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *S, features]``."""
    unit = functools.partial(
      ConvNormDropAct,
      self.features,
      use_bias=self.use_bias,
      dropout_rate=self.dropout_rate,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
    )
    return unit(name="conv_1")(unit(name="conv_0")(x, train), train)


class Down(nn.Module):
  """Max-pool 2 (floor, as torch) then a :class:`TwoConv` ``convs``:
  ``[B, *S, C] -> [B, *(S // 2), features]``."""

  features: int
  use_bias: bool = True
  dropout_rate: float = 0.0
  negative_slope: float = NEGATIVE_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *(S // 2), features]``."""
    window = (2,) * (x.ndim - 2)
    x = nn.max_pool(x, window, strides=window, padding="VALID")
    return TwoConv(
      self.features,
      use_bias=self.use_bias,
      dropout_rate=self.dropout_rate,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
      name="convs",
    )(x, train)


class UpCat(nn.Module):
  """Up-sample ``x``, concatenate the encoder map, :class:`TwoConv`.

  ``x [B, *S, C]``, ``skip [B, *S_e, C_e]`` with ``S_e`` = ``2 S`` or ``2 S + 1`` per axis ->
  ``[B, *S_e, features]``.

  Attributes:
    features: output channels.
    halves: the transposed conv outputs ``C // 2`` channels (else ``C``).
    use_bias, dropout_rate, negative_slope, dtype: of the TwoConv.
  Submodules: ``upsample`` (:class:`TransposedConvStride2`), ``convs``.
  """

  features: int
  halves: bool = True
  use_bias: bool = True
  dropout_rate: float = 0.0
  negative_slope: float = NEGATIVE_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, *S, C]``, ``skip [B, *S_e, C_e]`` -> ``[B, *S_e, features]``."""
    channels = x.shape[-1] // 2 if self.halves else x.shape[-1]
    up = TransposedConvStride2(channels, name="upsample")(x.astype(self.dtype))
    short = [e - u for e, u in zip(skip.shape[1:-1], up.shape[1:-1])]
    if any(d not in (0, 1) for d in short) or skip.shape[0] != up.shape[0]:
      raise ValueError(
        f"UpCat: the skip {skip.shape} does not fit the up-sampled map {up.shape} (spatial "
        "sides must be equal or one longer)"
      )
    # MONAI replicate-pads the up-sampled map by one voxel where the encoder side was odd.
    up = jnp.pad(up, [(0, 0), *((0, d) for d in short), (0, 0)], mode="edge")
    y = jnp.concatenate([skip.astype(up.dtype), up], axis=-1)
    return TwoConv(
      self.features,
      use_bias=self.use_bias,
      dropout_rate=self.dropout_rate,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
      name="convs",
    )(y, train)


class BasicUNet(nn.Module):
  """MONAI ``BasicUNet``: ``[B, *S, C_in] -> [B, *S, out_channels]`` (module docstring).

  Attributes:
    out_channels: logits per voxel (MONAI default 2).
    features: six channel counts, the five encoder levels and the last decoder level.
    bias: conv biases inside the TwoConv units (the transposed and final convs always have one).
    dropout_rate: dropout between norm and activation in every unit.
    negative_slope: of the LeakyReLU (MONAI 0.1).
    dtype: computation dtype (norm statistics in float32).
  Submodules: ``conv_0``, ``down_{1..4}``, ``upcat_{4..1}``, ``final_conv``.
  """

  out_channels: int = 2
  features: Sequence[int] = DEFAULT_FEATURES
  bias: bool = True
  dropout_rate: float = 0.0
  negative_slope: float = NEGATIVE_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args:
      x: ``[B, *S, C_in]``, every side of ``S`` a multiple of 16.
      train: dropout on (needs a ``'dropout'`` rng when ``dropout_rate > 0``).
    Returns:
      ``[B, *S, out_channels]`` logits.
    """
    if len(self.features) != 6:
      raise ValueError(f"BasicUNet features must be six channel counts, got {self.features}")
    check_input_sides(
      x.shape,
      SIZE_MULTIPLE,
      "BasicUNet",
      "Pad or crop the volume to such sides, or run it through a sliding-window inferer with "
      "such a window.",
    )
    f = tuple(int(c) for c in self.features)
    common = dict(
      use_bias=self.bias,
      dropout_rate=self.dropout_rate,
      negative_slope=self.negative_slope,
      dtype=self.dtype,
    )
    x0 = TwoConv(f[0], **common, name="conv_0")(x.astype(self.dtype), train)
    x1 = Down(f[1], **common, name="down_1")(x0, train)
    x2 = Down(f[2], **common, name="down_2")(x1, train)
    x3 = Down(f[3], **common, name="down_3")(x2, train)
    x4 = Down(f[4], **common, name="down_4")(x3, train)
    u4 = UpCat(f[3], **common, name="upcat_4")(x4, x3, train)
    u3 = UpCat(f[2], **common, name="upcat_3")(u4, x2, train)
    u2 = UpCat(f[1], **common, name="upcat_2")(u3, x1, train)
    u1 = UpCat(f[5], halves=False, **common, name="upcat_1")(u2, x0, train)
    n = x.ndim - 2
    return conv_layer(
      self.out_channels, 1, 1, n, use_bias=True, name="final_conv", dtype=self.dtype
    )(u1)
