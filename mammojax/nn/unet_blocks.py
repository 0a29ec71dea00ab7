"""MONAI's U-Net building blocks (DynUNet / UNETR), channels-last and N-d.

Every block takes ``[B, *S, C]`` with any number of spatial axes ``S`` (2D ``[B, H, W, C]``,
3D ``[B, D, H, W, C]``); kernels are ``[*k, C_in, C_out]``. Layer order, bias flags and
paddings follow ``monai.networks.blocks.dynunet_block`` and ``unetr_block`` (MONAI 1.6):

* :class:`UnetResBlock`: ``conv1`` (kernel k, stride s, no bias) -> norm -> LeakyReLU(0.01) ->
  ``conv2`` (kernel k, stride 1, no bias) -> norm; the residual is the input, or ``conv3``
  (1x1, stride s, no bias) -> norm when the channels change or ``s != 1``; sum -> LeakyReLU.
* :class:`UnetBasicBlock`: ``conv1`` -> norm -> LeakyReLU -> ``conv2`` -> norm -> LeakyReLU.
* :class:`UnetOutBlock`: ``conv``, 1x1 with a bias.
* :class:`UnetrBasicBlock`: ``layer``, a res or basic block.
* :class:`UnetrPrUpBlock`: ``transp_conv_init`` then ``num_layer`` times a transposed conv
  (``blocks_{i}_0``) and a res/basic block (``blocks_{i}_1``), or the transposed conv alone
  (``blocks_{i}``) without ``conv_block``.
* :class:`UnetrUpBlock`: ``transp_conv`` -> concatenate the skip (after the up-sampled map, on
  channels) -> ``conv_block`` (res or basic).

Names map to MONAI's state-dict keys by ``/`` -> ``.``, ``blocks_{i}_{j}`` -> ``blocks.{i}.{j}``
and one ``.conv`` level (MONAI wraps every conv in a ``Convolution``): ``conv1/kernel`` is
``conv1.conv.weight``. The norm is MONAI's default ``"instance"``: torch ``InstanceNorm`` without
affine parameters (eps 1e-5, biased variance), so the blocks hold conv kernels only.

Padding is MONAI's ``get_padding``: ``(k - s + 1) // 2`` on BOTH sides, which is "same" for odd
kernels at stride 1 but not Flax's ``'SAME'`` at stride 2 (that pads ``(0, 1)`` for k = 3 on an
even side), hence explicit pads. The convolutions are :class:`mammojax.nn.volume_conv.Conv`
(``nn.Conv``'s parameters; 3-D ones as 2-D convolutions over the depth taps on XLA:CPU, about 4x
faster there). The transposed convs have kernel = stride = 2 (MONAI's default
``upsample_kernel_size``, no padding, no bias) and are
:class:`mammojax.nn.conv_blocks.TransposedConvStride2` without a bias, ``[B, *S, C] ->
[B, *(2 S), C']``, whose kernel paints as torch's does: a torch ``[C_in, C_out, *k]`` weight
converts with :func:`mammojax.convert.layouts.torch_transposed_conv_kernel` without a flip.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import initializers, partitioning
from mammojax.nn.conv_blocks import TORCH_NORM_EPS, TransposedConvStride2, instance_norm
from mammojax.nn.volume_conv import Conv

# MONAI's norm_name values these blocks build: instance norm without affine parameters.
NORM_NAMES = ("instance",)
# MONAI's act_name default of the DynUNet blocks: LeakyReLU(negative_slope=0.01).
LEAKY_SLOPE = 0.01


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
  values = (value,) * n if isinstance(value, int) else tuple(int(v) for v in value)
  if len(values) != n:
    raise ValueError(f"expected an int or {n} values (one per spatial axis), got {value!r}")
  return values


def monai_padding(
  kernel_size: int | Sequence[int], strides: int | Sequence[int], num_spatial_dims: int
) -> tuple[tuple[int, int], ...]:
  """MONAI's ``get_padding``: ``(k - s + 1) // 2`` before and after, per spatial axis."""
  kernel = _tuple(kernel_size, num_spatial_dims)
  stride = _tuple(strides, num_spatial_dims)
  if any(k - s + 1 < 0 for k, s in zip(kernel, stride)):
    raise ValueError(f"kernel {kernel} smaller than stride {stride}: MONAI pads (k - s + 1) / 2")
  return tuple(((k - s + 1) // 2,) * 2 for k, s in zip(kernel, stride))


def _check_norm(norm: str) -> None:
  if norm not in NORM_NAMES:
    raise ValueError(
      f"norm {norm!r} is not supported; these blocks build MONAI's norm_name='instance' "
      "(instance norm without affine parameters)"
    )


def _normalise(x: jax.Array) -> jax.Array:
  # Statistics in float32 even under a bfloat16 dtype: a cubic volume has 10^5+ voxels.
  return instance_norm(x.astype(jnp.float32), TORCH_NORM_EPS).astype(x.dtype)


def _spatial_dims(x: jax.Array, block: str) -> int:
  if x.ndim < 3:
    raise ValueError(f"{block} expects [B, *S, C] with at least one spatial axis, got {x.shape}")
  return x.ndim - 2


def check_input_sides(shape: Sequence[int], multiple: int, model: str, hint: str) -> None:
  """Raises a ``ValueError`` naming ``shape`` when a spatial side of ``[B, *S, C]`` is not a
  positive multiple of ``multiple``."""
  spatial = tuple(shape[1:-1])
  if not spatial or any(side < multiple or side % multiple for side in spatial):
    raise ValueError(
      f"{model}: input of shape {tuple(shape)} ([B, *S, C]) has spatial sides {spatial}; each "
      f"must be a positive multiple of {multiple}. {hint}"
    )


def conv_layer(
  features: int,
  kernel_size: int | Sequence[int],
  strides: int | Sequence[int],
  num_spatial_dims: int,
  *,
  use_bias: bool,
  name: str,
  dtype: jnp.dtype = jnp.float32,
) -> Conv:
  """MONAI's ``get_conv_layer`` convolution: MONAI's padding, torch's default kernel init
  (``nn.Conv``'s parameters; 3-D kernels by depth taps on XLA:CPU, :mod:`mammojax.nn.volume_conv`)."""
  return Conv(
    features,
    _tuple(kernel_size, num_spatial_dims),
    strides=_tuple(strides, num_spatial_dims),
    padding=monai_padding(kernel_size, strides, num_spatial_dims),
    use_bias=use_bias,
    kernel_init=partitioning.conv_kernel_init(initializers.torch_default_kernel, num_spatial_dims),
    dtype=dtype,
    name=name,
  )


def transposed_conv_layer(
  features: int,
  kernel_size: int | Sequence[int],
  num_spatial_dims: int,
  *,
  name: str,
  dtype: jnp.dtype = jnp.float32,
) -> TransposedConvStride2:
  """MONAI's transposed ``get_conv_layer`` with stride = kernel = 2 and no bias: each input voxel
  paints a 2-sided patch, ``[B, *S, C] -> [B, *(2 S), features]`` (its kernel as torch's,
  not flipped)."""
  if set(_tuple(kernel_size, num_spatial_dims)) != {2}:
    raise ValueError(
      f"upsample_kernel_size={kernel_size}: the UNETR / UNet up-sampling here is 2 on every axis "
      "(MONAI's default)"
    )
  return TransposedConvStride2(features, use_bias=False, dtype=dtype, name=name)


class UnetResBlock(nn.Module):
  """Residual conv block: ``[B, *S, C_in] -> [B, *S', features]``, ``S' = ceil(S / strides)``
  for odd kernels (see the module docstring for the layers).

  Attributes:
    features: output channels.
    kernel_size: of ``conv1`` and ``conv2``, an int or one per spatial axis.
    strides: of ``conv1`` and the residual ``conv3``.
    norm: ``'instance'`` (MONAI's ``norm_name``).
    negative_slope: of the LeakyReLU.
    dtype: computation dtype.
  Submodules: ``conv1``, ``conv2`` and, when channels or resolution change, ``conv3``.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  norm: str = "instance"
  negative_slope: float = LEAKY_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C_in]`` -> ``[B, *S', features]``."""
    _check_norm(self.norm)
    n = _spatial_dims(x, "UnetResBlock")
    act = lambda y: nn.leaky_relu(y, self.negative_slope)
    conv = lambda k, s, name: conv_layer(
      self.features, k, s, n, use_bias=False, name=name, dtype=self.dtype
    )
    y = act(_normalise(conv(self.kernel_size, self.strides, "conv1")(x)))
    y = _normalise(conv(self.kernel_size, 1, "conv2")(y))
    residual = x
    if x.shape[-1] != self.features or any(s != 1 for s in _tuple(self.strides, n)):
      residual = _normalise(conv(1, self.strides, "conv3")(x))
    return act(y + residual)


class UnetBasicBlock(nn.Module):
  """Two convs, each followed by norm and LeakyReLU: ``[B, *S, C_in] -> [B, *S', features]``.

  Attributes as :class:`UnetResBlock`. Submodules: ``conv1``, ``conv2``.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  norm: str = "instance"
  negative_slope: float = LEAKY_SLOPE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C_in]`` -> ``[B, *S', features]``."""
    _check_norm(self.norm)
    n = _spatial_dims(x, "UnetBasicBlock")
    act = lambda y: nn.leaky_relu(y, self.negative_slope)
    conv = lambda s, name: conv_layer(
      self.features, self.kernel_size, s, n, use_bias=False, name=name, dtype=self.dtype
    )
    y = act(_normalise(conv(self.strides, "conv1")(x)))
    return act(_normalise(conv(1, "conv2")(y)))


def _conv_block(
  res_block: bool,
  features: int,
  kernel_size: int | Sequence[int],
  strides: int | Sequence[int],
  norm: str,
  dtype: jnp.dtype,
  name: str,
) -> UnetResBlock | UnetBasicBlock:
  block = UnetResBlock if res_block else UnetBasicBlock
  return block(features, kernel_size, strides, norm, dtype=dtype, name=name)


class UnetOutBlock(nn.Module):
  """The 1x1 output conv with a bias: ``[B, *S, C] -> [B, *S, features]``. Submodule ``conv``."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C]`` -> ``[B, *S, features]``."""
    n = _spatial_dims(x, "UnetOutBlock")
    return conv_layer(self.features, 1, 1, n, use_bias=True, name="conv", dtype=self.dtype)(x)


class UnetrBasicBlock(nn.Module):
  """UNETR's first encoder stage: a res or basic block named ``layer`` (MONAI's wrapper).

  ``[B, *S, C_in] -> [B, *S', features]``; attributes as :class:`UnetResBlock`, and
  ``res_block`` picks :class:`UnetResBlock` over :class:`UnetBasicBlock`.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  norm: str = "instance"
  res_block: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C_in]`` -> ``[B, *S', features]``."""
    return _conv_block(
      self.res_block, self.features, self.kernel_size, self.strides, self.norm, self.dtype, "layer"
    )(x)


class UnetrPrUpBlock(nn.Module):
  """Projection up-sampling of ViT tokens: ``[B, *g, C_in] -> [B, *(u^(1 + num_layer) g),
  features]`` with ``u`` = ``upsample_kernel_size`` (2: x2 per transposed conv).

  Attributes:
    features: output channels (of every layer).
    num_layer: transposed convs after ``transp_conv_init``.
    kernel_size: of the conv blocks.
    strides: of the conv blocks (MONAI's UNETR: 1).
    upsample_kernel_size: kernel = stride of the transposed convs.
    norm: ``'instance'``.
    conv_block: follow each of the ``num_layer`` transposed convs with a conv block.
    res_block: that block is :class:`UnetResBlock` (else :class:`UnetBasicBlock`).
    dtype: computation dtype.
  Submodules: ``transp_conv_init``; ``blocks_{i}_0`` (transposed conv) and ``blocks_{i}_1``
  (block) with ``conv_block``, else ``blocks_{i}`` (transposed conv).
  """

  features: int
  num_layer: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  upsample_kernel_size: int | Sequence[int] = 2
  norm: str = "instance"
  conv_block: bool = False
  res_block: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *g, C_in]`` -> ``[B, *(u^(1 + num_layer) g), features]``."""
    n = _spatial_dims(x, "UnetrPrUpBlock")
    up = lambda name: transposed_conv_layer(
      self.features, self.upsample_kernel_size, n, name=name, dtype=self.dtype
    )
    x = up("transp_conv_init")(x)
    for i in range(self.num_layer):
      if self.conv_block:
        x = up(f"blocks_{i}_0")(x)
        x = _conv_block(
          self.res_block,
          self.features,
          self.kernel_size,
          self.strides,
          self.norm,
          self.dtype,
          f"blocks_{i}_1",
        )(x)
      else:
        x = up(f"blocks_{i}")(x)
    return x


class UnetrUpBlock(nn.Module):
  """Decoder stage: up-sample, concatenate the skip, conv block.

  ``x [B, *S, C_in]``, ``skip [B, *(u S), features]`` -> ``[B, *(u S), features]``.

  Attributes:
    features: output channels, and the skip's channels.
    kernel_size: of the conv block.
    upsample_kernel_size: kernel = stride ``u`` of ``transp_conv``.
    norm: ``'instance'``.
    res_block: :class:`UnetResBlock` (else :class:`UnetBasicBlock`) as ``conv_block``.
    dtype: computation dtype.
  Submodules: ``transp_conv``, ``conv_block``.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  upsample_kernel_size: int | Sequence[int] = 2
  norm: str = "instance"
  res_block: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    """``x [B, *S, C_in]``, ``skip [B, *(u S), features]`` -> ``[B, *(u S), features]``."""
    n = _spatial_dims(x, "UnetrUpBlock")
    y = transposed_conv_layer(
      self.features, self.upsample_kernel_size, n, name="transp_conv", dtype=self.dtype
    )(x)
    if skip.shape[:-1] != y.shape[:-1]:
      raise ValueError(
        f"UnetrUpBlock: the skip {skip.shape} does not match the up-sampled input {y.shape} "
        "on batch and spatial axes"
      )
    y = jnp.concatenate([y, skip.astype(y.dtype)], axis=-1)
    return _conv_block(
      self.res_block, self.features, self.kernel_size, 1, self.norm, self.dtype, "conv_block"
    )(y)
