"""Feature Pyramid Network over two backbone stages, plus a subsampled coarsest level.

Follows the FPN-MIL feature extractor: 1x1 lateral convs on the stride-16 and stride-32 backbone
maps, a nearest-neighbour top-down pathway, 3x3 output convs, and an extra level made by taking
every 4th pixel of the stride-32 output (the reference's ``max_pool2d(kernel_size=1, stride=4)``),
i.e. stride 128. With ``group_norm`` every conv is followed by GroupNorm(1 group) and has no bias;
the reference builds ONE GroupNorm module and reuses it after all four convs, so they share its
scale and bias, and so does this module. The FPN has no activation.

The levels are also sown into the ``'intermediates'`` collection as ``stride_16``, ``stride_32``
and ``stride_128`` when the caller makes it mutable (``apply(..., mutable=['intermediates'])``),
and pass through ``perturb`` under the same names (:func:`mammojax.nn.intermediates.expose`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.nn import partitioning
from mammojax.nn.intermediates import expose
from mammojax.nn.resize import downsample, resize_nearest


class FPN(nn.Module):
  """Two-level FPN with a stride-128 extra level.

  Attributes:
    features: output channels of every level (the reference's ``fpn_dim``, 256).
    top_down: add the upsampled coarser lateral to the finer one ('fpn'); False gives the
      reference's 'backbone_pyramid' (laterals and output convs only).
    group_norm: GroupNorm(num_groups=1) after every conv, convs without bias.
  """

  features: int = 256
  top_down: bool = True
  group_norm: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, stride16: jax.Array, stride32: jax.Array) -> dict[int, jax.Array]:
    """Builds the pyramid.

    Args:
      stride16: [B, H16, W16, C4] backbone map at stride 16.
      stride32: [B, H32, W32, C5] backbone map at stride 32.

    Returns:
      {16: [B, H16, W16, F], 32: [B, H32, W32, F], 128: [B, ceil(H32/4), ceil(W32/4), F]}.
    """
    if stride16.ndim != 4 or stride32.ndim != 4:
      raise ValueError(
        "FPN expects [B, H, W, C] maps, got stride16 "
        f"{stride16.shape} and stride32 {stride32.shape}."
      )
    norm = (
      nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=self.dtype, name="norm")
      if self.group_norm
      else (lambda y: y)
    )

    def conv(kernel: int, name: str):
      return nn.Conv(
        self.features,
        (kernel, kernel),
        padding=kernel // 2,
        use_bias=not self.group_norm,
        dtype=self.dtype,
        name=name,
        kernel_init=partitioning.conv_kernel_init(nn.initializers.kaiming_uniform()),
      )

    inner32 = norm(conv(1, "inner_block_1")(stride32))
    out32 = norm(conv(3, "layer_block_1")(inner32))
    inner16 = norm(conv(1, "inner_block_0")(stride16))
    if self.top_down:
      inner16 = inner16 + resize_nearest(inner32, (inner16.shape[1], inner16.shape[2]))
    out16 = expose(self, "stride_16", norm(conv(3, "layer_block_0")(inner16)))
    # Exposed before the stride-128 level is taken from it, so that a gradient at stride_32
    # counts both of its uses.
    out32 = expose(self, "stride_32", out32)
    # The reference's max_pool2d(kernel_size=1, stride=4): every 4th pixel.
    out128 = expose(self, "stride_128", downsample(out32, 4, "subsample"))
    return {16: out16, 32: out32, 128: out128}
