"""MammoRegNet: coarse-to-fine deformable mammogram registration (conv encoder, Swin decoder).

Architecture (as the public PyTorch MammoRegNet of Longitudinal_Mammogram_Alignment / BCRBench):

- A shared encoder of five conv blocks (3x3 conv, LeakyReLU 0.2, InstanceNorm, twice) with
  ``enc_channels * (1, 2, 4, 8, 16)`` channels and 2x2 average pooling between levels, applied
  to the fixed and the moving image.
- Level 5 (1/16): fixed and moving features are concatenated, projected by a 1x1 conv
  (``backdim_5``) and refined by a Swin stage; an affine head (spatial mean, Dense, ReLU, Dense,
  tanh) predicts 6 affine parameters, which define the level-5 flow.
- Levels 4..2: the finer level's flow is upsampled (x2 values, then bilinear with
  ``align_corners=True``), the moving features of the level are warped by it, the coarser
  decoder features are patch-expanded, and ``[fixed, expanded, warped moving]`` is projected
  (1x1 conv) and refined by a Swin stage; a 3x3 conv head adds a residual flow.
- Level 1 (full size): the same with a conv block instead of a Swin stage.

Flow convention. The reference's flow is ``[B, 2, H, W]`` in pixels of the full-size image,
channel 0 = rows, channel 1 = columns, and its spatial transformer samples
``moving(x + flow(x))`` bilinearly with ``align_corners=True`` normalisation and zero padding,
i.e. at exactly the pixel coordinate ``x + flow(x)``. That is mammojax's convention (docs/ARCHITECTURE.md),
so the only conversion is the layout: ``ours = reference.transpose(0, 2, 3, 1)``
(``[B, H, W, 2]``, 'ij'); warping uses :func:`mammojax.nn.warp.warp` unchanged.

Affine convention. ``affine_params`` is the reference's ``[B, 6]`` tanh output ``p``; the affine
transform is ``theta = p.reshape(2, 3) + [[1, 0, 0], [0, 1, 0]]`` in PyTorch ``affine_grid``
terms: it maps normalised output coordinates ``(x, y, 1)`` (x = columns, y = rows, -1..1 at the
first/last pixel centre, ``align_corners=True``) to normalised input coordinates ``(x, y)``.
:func:`affine_params_to_flow` turns it into a pixel flow in our convention.

Valid inputs: ``H`` and ``W`` positive multiples of 16 (four 2x poolings, and each decoder
level must be exactly twice the next). Windows need no divisibility: maps are padded to the
window, and a map smaller than the 5x5 window uses a smaller window (see ``mammojax.nn.swin``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.nn import initializers, partitioning, swin
from mammojax.nn.conv_blocks import instance_norm
from mammojax.nn.resize import downsample, resize_linear_align_corners
from mammojax.nn.warp import warp

Activation = Callable[[jax.Array], jax.Array]

# Four 2x poolings between the five encoder levels.
SIZE_MULTIPLE = 16

_dense_init = partitioning.dense_kernel_init(initializers.torch_default_kernel)
_conv_init = partitioning.conv_kernel_init(initializers.torch_default_kernel)


def leaky_relu_0_2(x: jax.Array) -> jax.Array:
  """The reference's ``LeakyReLU(0.2)``."""
  return nn.leaky_relu(x, negative_slope=0.2)


def upsample_flow_2x(flow: jax.Array) -> jax.Array:
  """Upsamples a pixel flow ``[B, h, w, 2]`` to ``[B, 2h, 2w, 2]`` as the reference does.

  Values are doubled, then resampled bilinearly with ``align_corners=True`` (output index ``i``
  reads input position ``i * (h - 1) / (2h - 1)``). Note this is not :func:`mammojax.nn.warp.
  resize_displacement`, which uses half-pixel centres and scales by the size ratio.
  """
  return resize_linear_align_corners(2.0 * flow, tuple(2 * n for n in flow.shape[1:-1]))


def _normalised_positions(size: int, dtype: np.dtype) -> np.ndarray:
  """``affine_grid(align_corners=True)`` base coordinates: -1..1, or 0 for a single pixel."""
  if size <= 1:
    return np.zeros((size,), dtype)
  return np.linspace(-1.0, 1.0, size).astype(dtype)


def affine_params_to_flow(affine_params: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Pixel flow ``[B, H, W, 2]`` ('ij') of the reference's affine parameters on a map of ``size``.

  Args:
    affine_params: ``[B, 6]``; ``theta = params.reshape(2, 3) + identity`` in PyTorch
      ``affine_grid`` (normalised, x = columns first, ``align_corners=True``) terms.
    size: ``(H, W)`` of the map the flow is for.
  Returns:
    ``[B, H, W, 2]`` displacement in pixels of that map, channel 0 = rows.
  """
  height, width = size
  theta = affine_params.reshape(-1, 2, 3) + jnp.asarray(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], affine_params.dtype
  )
  dtype = np.dtype(affine_params.dtype)
  y_norm = jnp.asarray(_normalised_positions(height, dtype))[None, :, None]
  x_norm = jnp.asarray(_normalised_positions(width, dtype))[None, None, :]
  t = theta[:, :, :, None, None]
  x_src = t[:, 0, 0] * x_norm + t[:, 0, 1] * y_norm + t[:, 0, 2]  # [B, H, W]
  y_src = t[:, 1, 0] * x_norm + t[:, 1, 1] * y_norm + t[:, 1, 2]
  rows = (y_src / 2.0 + 0.5) * (height - 1) - jnp.arange(height, dtype=x_src.dtype)[:, None]
  cols = (x_src / 2.0 + 0.5) * (width - 1) - jnp.arange(width, dtype=x_src.dtype)[None, :]
  return jnp.stack([rows, cols], axis=-1)


class ConvBlock(nn.Module):
  """(3x3 conv -> LeakyReLU 0.2 -> InstanceNorm) x 2, ``[B, H, W, C_in] -> [B, H, W, features]``.

  Each step is :class:`mammojax.nn.conv_blocks.ConvNormAct` with ``norm='instance'`` and
  ``activation_before_norm``, written out here to keep the checkpoint names ``Conv_1``, ``Conv_2``.
  """

  features: int
  activation: Activation = leaky_relu_0_2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name in ("Conv_1", "Conv_2"):
      x = nn.Conv(self.features, (3, 3), padding="SAME", kernel_init=_conv_init, name=name)(x)
      x = instance_norm(self.activation(x))
    return x


class ConvEncoder(nn.Module):
  """Five conv blocks, ``channels * 2**k`` features, 2x2 average pooling between them."""

  channels: int
  activation: Activation = leaky_relu_0_2

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """``[B, H, W, C]`` -> features at 1, 1/2, 1/4, 1/8, 1/16 of the size."""
    features = []
    for level in range(5):
      if level:
        x = downsample(x, 2, "avg")
      x = ConvBlock(self.channels * 2**level, self.activation, name=f"conv_{level + 1}")(x)
      features.append(x)
    return features


class DeformHead(nn.Module):
  """3x3 conv to a 2-channel residual flow; initialised near zero (N(0, 1e-5), zero bias)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(
      2,
      (3, 3),
      padding="SAME",
      kernel_init=partitioning.conv_kernel_init(nn.initializers.normal(1e-5)),
      name="reg_head",
    )(x)


class AffineHead(nn.Module):
  """Global affine from the coarsest features: mean -> Dense(C/2) -> ReLU -> Dense(6) -> tanh."""

  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[B, h, w, C]`` -> (flow ``[B, h, w, 2]`` pixels 'ij', affine_params ``[B, 6]``)."""
    channels = x.shape[-1]
    h = jnp.mean(x, axis=(1, 2))
    h = nn.Dense(channels // 2, use_bias=False, kernel_init=_dense_init, name="affine_head_1")(h)
    h = nn.Dense(6, use_bias=False, kernel_init=_dense_init, name="affine_head_2")(
      self.activation(h)
    )
    params = jnp.tanh(h)
    return affine_params_to_flow(params, x.shape[1:3]), params


class TransDecoder(nn.Module):
  """Coarse-to-fine Swin decoder; returns the full-size flow and the affine parameters."""

  dec_channels: int
  num_layers: int
  window_size: tuple[int, int]
  mlp_ratio: float
  qkv_bias: bool
  warp_impl: str

  @nn.compact
  def __call__(
    self, fixed: list[jax.Array], moving: list[jax.Array]
  ) -> tuple[jax.Array, jax.Array]:
    d = self.dec_channels

    def stage(level: int) -> swin.SwinStage:
      return swin.SwinStage(
        d * 2 ** (level - 1),
        self.num_layers,
        d // 2 ** (5 - level),
        tuple(self.window_size),
        self.mlp_ratio,
        self.qkv_bias,
        name=f"trans_{level}",
      )

    def backdim(level: int) -> nn.Conv:
      return nn.Conv(d * 2 ** (level - 1), (1, 1), kernel_init=_conv_init, name=f"backdim_{level}")

    x = backdim(5)(jnp.concatenate([fixed[4], moving[4]], axis=-1))
    x = stage(5)(x)
    flow, affine_params = AffineHead(name="reghead_5")(x)
    for level in (4, 3, 2, 1):
      flow_up = upsample_flow_2x(flow)
      moving_warped = warp(moving[level - 1], flow_up, impl=self.warp_impl)
      up = swin.PatchExpanding(d * 2**level, name=f"upsample_{level}")(x)
      x = jnp.concatenate([fixed[level - 1], up, moving_warped], axis=-1)
      if level > 1:
        x = stage(level)(backdim(level)(x))
      else:
        x = ConvBlock(d, name="conv_1")(x)
      flow = DeformHead(name=f"reghead_{level}")(x) + flow_up
    return flow, affine_params


class MammoRegNet(nn.Module):
  """Deformable registration of a moving to a fixed mammogram.

  Hyper-parameters default to the reference's (``MammoRegNet()`` in the public code):
  ``in_channels=1, enc_channels=8, dec_channels=16``, Swin stages of 4 blocks, 5x5 windows
  (shift 2), MLP ratio 4, qkv bias; stage heads ``dec_channels // (8, 4, 2, 1)`` at levels 2..5.
  The reference's gradient checkpointing is a memory option without numerical effect; wrap the
  module with ``nn.remat`` for the same.

  Attributes:
    warp_impl: implementation of :func:`mammojax.nn.warp.warp` ('gather' or 'map_coordinates').
  """

  in_channels: int = 1
  enc_channels: int = 8
  dec_channels: int = 16
  num_layers: int = 4
  window_size: tuple[int, int] = (5, 5)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  warp_impl: str = "gather"

  def _check(self, fixed: jax.Array, moving: jax.Array) -> None:
    for name, image in (("fixed", fixed), ("moving", moving)):
      if image.ndim != 4 or image.shape[-1] != self.in_channels:
        raise ValueError(
          f"MammoRegNet: {name} must be [B, H, W, {self.in_channels}] "
          f"(channels-last, in_channels={self.in_channels}), got {image.shape}"
        )
    if fixed.shape != moving.shape:
      raise ValueError(
        f"MammoRegNet: fixed {fixed.shape} and moving {moving.shape} must have the same shape"
      )
    height, width = fixed.shape[1:3]
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
      raise ValueError(
        f"MammoRegNet: image size (H, W) = ({height}, {width}) must be positive "
        f"multiples of {SIZE_MULTIPLE} (four 2x poolings); resize or pad to e.g. "
        f"({-(-height // SIZE_MULTIPLE) * SIZE_MULTIPLE}, "
        f"{-(-width // SIZE_MULTIPLE) * SIZE_MULTIPLE})"
      )
    for level in (2, 3, 4, 5):
      embed, heads = self.dec_channels * 2 ** (level - 1), self.dec_channels // 2 ** (5 - level)
      if heads < 1 or embed % heads:
        raise ValueError(
          f"MammoRegNet: dec_channels={self.dec_channels} gives a Swin stage "
          f"with {embed} channels and {heads} heads at level {level}; use a "
          "multiple of 8"
        )

  @nn.compact
  def __call__(self, moving: jax.Array, fixed: jax.Array) -> dict[str, jax.Array]:
    """Registers ``moving`` to ``fixed`` (moving first, as every registration network here).

    Args:
      moving: ``[B, H, W, in_channels]``; H and W multiples of 16.
      fixed: same shape.
    Returns:
      'warped': ``[B, H, W, C]`` moving warped by 'flow'.
      'flow': ``[B, H, W, 2]`` pixels, 'ij' (channel 0 = rows);
        ``warped(x) = moving(x + flow(x))``, bilinear, zero outside.
      'affine_warped': ``[B, H, W, C]`` moving warped by the affine transform alone.
      'affine_params': ``[B, 6]`` (see the module docstring and :func:`affine_params_to_flow`).
    """
    self._check(fixed, moving)
    batch = fixed.shape[0]
    encoder = ConvEncoder(self.enc_channels, name="Encoder")
    # One pass over both images: instance norm is per example, so this equals two passes.
    features = encoder(jnp.concatenate([fixed, moving], axis=0))
    fixed_features = [f[:batch] for f in features]
    moving_features = [f[batch:] for f in features]
    flow, affine_params = TransDecoder(
      self.dec_channels,
      self.num_layers,
      tuple(self.window_size),
      self.mlp_ratio,
      self.qkv_bias,
      self.warp_impl,
      name="Decoder",
    )(fixed_features, moving_features)
    affine_flow = affine_params_to_flow(affine_params, fixed.shape[1:3])
    return {
      "warped": warp(moving, flow, impl=self.warp_impl),
      "flow": flow,
      "affine_warped": warp(moving, affine_flow, impl=self.warp_impl),
      "affine_params": affine_params,
    }
