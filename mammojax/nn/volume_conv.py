"""A convolution with ``nn.Conv``'s parameters, computed the way each backend runs it fastest.

* :class:`Conv`: ``nn.Conv``'s parameters (``kernel [*k, C_in, C_out]``, ``bias [C_out]``) and
  results. With ``impl='depth_taps'`` (what ``'auto'`` picks on XLA:CPU for a 3-D kernel whose
  depth stride is 1) the 3-D convolution is the sum over the kernel's depth taps of 2-D
  convolutions of depth-shifted slices, the depth folded into the batch: XLA:CPU runs 2-D
  convolutions through a much faster kernel than 3-D ones (a 3x3x3, 16 -> 16 convolution of
  ``[4, 32, 32, 32, 16]``: 187 ms as one 3-D convolution, 46 ms as three 2-D ones, on the 2-core
  dev VM; torch's oneDNN: 52 ms). Elsewhere (GPU, TPU) ``'auto'`` keeps the native convolution.

The up-sampling of the UNETR and UNet decoders is
:class:`mammojax.nn.conv_blocks.TransposedConvStride2`, one matrix product and a reshape (XLA:CPU's
transposed 3-D convolution ``nn.ConvTranspose`` took 484 ms where it takes 31 ms, same shapes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = nn.initializers.Initializer
IMPLS = ("auto", "native", "depth_taps")


def _pairs(padding: Sequence[tuple[int, int]], n: int) -> tuple[tuple[int, int], ...]:
  pairs = tuple((int(a), int(b)) for a, b in padding)
  if len(pairs) != n:
    raise ValueError(f"padding {padding} needs one (before, after) pair per spatial axis ({n})")
  return pairs


def use_depth_taps(impl: str, kernel_size: Sequence[int], strides: Sequence[int]) -> bool:
  """Whether :class:`Conv` takes the depth-taps route for ``impl`` on the default backend."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; use one of {IMPLS}")
  applicable = len(kernel_size) == 3 and strides[0] == 1
  if impl == "depth_taps":
    if not applicable:
      raise ValueError("impl='depth_taps' needs a 3-D kernel and a depth stride of 1")
    return True
  return impl == "auto" and applicable and jax.default_backend() == "cpu"


def conv_by_depth_taps(
  x: jax.Array,
  kernel: jax.Array,
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]],
) -> jax.Array:
  """``[B, D, H, W, C] * [kd, kh, kw, C, O] -> [B, D', H', W', O]`` as ``kd`` 2-D convolutions
  (depth stride 1; ``padding`` explicit pairs per axis; no bias)."""
  (d_before, d_after), *plane_padding = padding
  x = jnp.pad(x, ((0, 0), (d_before, d_after), (0, 0), (0, 0), (0, 0)))
  batch, depth, height, width, channels = x.shape
  taps = kernel.shape[0]
  out_depth = depth - taps + 1
  if out_depth < 1:
    raise ValueError(f"kernel depth {taps} is larger than the padded input depth {depth}")
  out = None
  for tap in range(taps):
    planes = x[:, tap : tap + out_depth].reshape(batch * out_depth, height, width, channels)
    y = jax.lax.conv_general_dilated(
      planes,
      kernel[tap],
      tuple(strides[1:]),
      tuple(plane_padding),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    out = y if out is None else out + y
  return out.reshape(batch, out_depth, *out.shape[1:])


class Conv(nn.Module):
  """``nn.Conv`` with explicit padding pairs: ``[B, *S, C] -> [B, *S', features]``.

  Attributes:
    features: output channels.
    kernel_size: one size per spatial axis.
    strides: one stride per spatial axis.
    padding: ``(before, after)`` per spatial axis.
    use_bias: add a bias.
    kernel_init: of ``kernel [*k, C, features]``.
    dtype: computation dtype (None: that of the input and parameters).
    impl: ``'auto'`` (depth taps on XLA:CPU for 3-D kernels, else native), ``'native'`` or
      ``'depth_taps'`` (see the module docstring).
  """

  features: int
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype | None = None
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.kernel_size)
    if x.ndim != n + 2:
      raise ValueError(
        f"Conv with a {n}-D kernel expects [B, *S, C] of rank {n + 2}, got {x.shape}"
      )
    padding = _pairs(self.padding, n)
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
    dtype = self.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if use_depth_taps(self.impl, self.kernel_size, self.strides):
      y = conv_by_depth_taps(x, kernel, self.strides, padding)
    else:
      spatial = "DHW"[-n:] if n <= 3 else None
      if spatial is None:
        raise ValueError(f"Conv supports 1-3 spatial axes, got {n}")
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(self.strides),
        padding,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
      )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
      y = y + bias.astype(dtype)
    return y
