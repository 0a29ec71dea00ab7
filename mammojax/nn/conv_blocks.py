"""Convolution blocks for 2D and 3D channels-last inputs (``[B, *S, C]``, ``len(S)`` = 2 or 3).

* :func:`instance_norm`: torch ``InstanceNorm{2,3}d`` without affine parameters or running
  statistics, per example and channel over the spatial axes.
* :class:`ConvNormAct`: convolution, normalisation (batch / instance / group / none) and an
  injectable activation, in torch's parameter layout and initialisation.
* :class:`TransposedConvStride2`: the kernel-2, stride-2 transposed convolution of Swin patch
  expanding and UNETR up-sampling blocks, as one einsum.

Up- and down-sampling without parameters is in :mod:`mammojax.nn.resize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import initializers, partitioning

NormKind = Literal["batch", "instance", "group", "none"]
NORM_KINDS = ("batch", "instance", "group", "none")
# torch's BatchNorm / InstanceNorm / GroupNorm default epsilon.
TORCH_NORM_EPS = 1e-5


def instance_norm(x: jax.Array, epsilon: float = TORCH_NORM_EPS) -> jax.Array:
  """Normalises ``[B, *S, C]`` per example and channel over ``S`` (biased variance), no affine."""
  axes = tuple(range(1, x.ndim - 1))
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon)


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
  return (value,) * n if isinstance(value, int) else tuple(value)


class ConvNormAct(nn.Module):
  """Convolution -> normalisation -> activation (or conv -> activation -> norm).

  ``[B, *S, C_in] -> [B, *S', features]`` with ``S' = ceil(S / stride)`` for ``'SAME'`` padding.

  Attributes:
    features: output channels.
    num_spatial_dims: 2 or 3; the input must be ``[B, *S, C]`` with ``len(S)`` of it.
    kernel_size: an int (same along every axis) or one per axis.
    strides: likewise.
    padding: as ``nn.Conv`` (``'SAME'``, ``'VALID'`` or explicit pairs).
    norm: ``'batch'`` (running statistics in ``batch_stats``), ``'instance'`` (no parameters,
      as torch's default ``InstanceNorm``), ``'group'`` or ``'none'``.
    num_groups: groups of the group norm.
    activation: applied after the norm (``None``: none); replace it to change the gradient
      (e.g. guided backpropagation) without editing the model.
    activation_before_norm: conv -> activation -> norm instead (MammoRegNet's conv blocks).
    use_bias: conv bias; ``None`` = only without a norm that has its own shift (batch, group).
    bn_momentum: Flax momentum of the batch norm (0.9 == torch's 0.1).
    epsilon: norm epsilon (torch's 1e-5).
    kernel_init: conv kernel initialiser (torch's default).
    dtype: computation dtype.
  Submodules: ``conv``, and ``norm`` for batch and group norm.
  """

  features: int
  num_spatial_dims: int = 2
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  norm: NormKind = "batch"
  num_groups: int = 8
  activation: Callable[[jax.Array], jax.Array] | None = nn.relu
  activation_before_norm: bool = False
  use_bias: bool | None = None
  bn_momentum: float = 0.9
  epsilon: float = TORCH_NORM_EPS
  kernel_init: nn.initializers.Initializer = initializers.torch_default_kernel
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Args: x ``[B, *S, C_in]``; train: batch norm uses and updates batch statistics."""
    n = self.num_spatial_dims
    if x.ndim != n + 2:
      raise ValueError(
        f"ConvNormAct with num_spatial_dims={n} expects [B, *S, C] with {n} spatial axes, "
        f"got {x.shape}"
      )
    if self.norm not in NORM_KINDS:
      raise ValueError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
    use_bias = self.norm in ("instance", "none") if self.use_bias is None else self.use_bias
    x = nn.Conv(
      self.features,
      _tuple(self.kernel_size, n),
      strides=_tuple(self.strides, n),
      padding=self.padding,
      use_bias=use_bias,
      kernel_init=partitioning.conv_kernel_init(self.kernel_init, n),
      dtype=self.dtype,
      name="conv",
    )(x)
    act = self.activation or (lambda y: y)
    if self.activation_before_norm:
      x = act(x)
    if self.norm == "batch":
      x = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=self.epsilon,
        dtype=self.dtype,
        name="norm",
      )(x)
    elif self.norm == "group":
      x = nn.GroupNorm(
        num_groups=self.num_groups, epsilon=self.epsilon, dtype=self.dtype, name="norm"
      )(x)
    elif self.norm == "instance":
      x = instance_norm(x, self.epsilon)
    return x if self.activation_before_norm else act(x)


class TransposedConvStride2(nn.Module):
  """Transposed convolution with kernel 2 and stride 2: each input pixel paints a ``2^n`` patch.

  ``kernel [2, ..., 2, C_in, C_out]``: in 2D ``y[2i + a, 2j + b] = x[i, j] @ kernel[a, b] +
  bias`` (3D likewise); a PyTorch ``ConvTranspose{2,3}d`` weight ``[C_in, C_out, 2, ...]``
  converts with :func:`mammojax.convert.layouts.torch_transposed_conv_kernel` (no flip). Written
  as one einsum, which is cheaper than a dilated convolution (on XLA:CPU 16x cheaper than
  ``nn.ConvTranspose`` for a 3-D one). Initialised as torch does.

  Attributes:
    features: output channels.
    use_bias: add a bias (MONAI's UNETR up-sampling has none).
    dtype: computation dtype (None: that of the input and parameters).
  """

  features: int
  use_bias: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, *S, C_in]`` -> ``[B, *(2 S), features]``."""
    batch, *spatial, channels = x.shape
    n = len(spatial)
    kernel = self.param(
      "kernel",
      partitioning.conv_kernel_init(initializers.torch_default_transposed_kernel, n),
      (2,) * n + (channels, self.features),
    )
    dtype = self.dtype or jnp.result_type(x, kernel)
    # 2D: "bpqc,uvco->bpuqvo": output pixel (2p + u, 2q + v), offsets interleaved with pixels.
    pixel, offset = "pqr"[:n], "uvw"[:n]
    paired = "".join(p + o for p, o in zip(pixel, offset))
    y = jnp.einsum(f"b{pixel}c,{offset}co->b{paired}o", x.astype(dtype), kernel.astype(dtype))
    y = y.reshape(batch, *(2 * s for s in spatial), self.features)
    if not self.use_bias:
      return y
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, partitioning.BIAS_AXES),
      (self.features,),
    )
    return y + bias.astype(dtype)
