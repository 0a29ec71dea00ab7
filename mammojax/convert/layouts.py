"""PyTorch -> Flax weight layouts (numpy only; torch is never imported here).

Torch stores channels first, Flax channels last:

* ``nn.Linear`` weight ``[O, I]`` -> ``nn.Dense`` kernel ``[I, O]``;
* ``nn.Conv{1,2,3}d`` weight ``[O, I / groups, *k]`` -> ``nn.Conv`` kernel ``[*k, I / groups, O]``
  (a depthwise ``[C, 1, *k]`` becomes ``[*k, 1, C]``);
* ``nn.ConvTranspose{1,2,3}d`` weight ``[I, O, *k]`` -> ``[*k, I, O]``; spatially flipped for
  Flax's ``nn.ConvTranspose``, which does not flip its kernel (torch's transposed convolution is
  the gradient of a correlation, i.e. a convolution with the flipped kernel), unflipped for
  :class:`mammojax.nn.conv_blocks.TransposedConvStride2`, which paints each input pixel's patch
  with the kernel as torch does.

The converters keep the dtype and may return views; the ``*_shape`` functions give the torch shape
that converts to a Flax shape, for error messages in the importers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def torch_dense_kernel(weight: Any) -> np.ndarray:
  """``[O, I]`` -> ``[I, O]``."""
  weight = np.asarray(weight)
  if weight.ndim != 2:
    raise ValueError(f"a torch Linear weight is [out, in], got shape {weight.shape}")
  return weight.T


def torch_conv_kernel(weight: Any) -> np.ndarray:
  """``[O, I, *k]`` -> ``[*k, I, O]`` for any number of spatial axes."""
  weight = np.asarray(weight)
  if weight.ndim < 3:
    raise ValueError(f"a torch conv weight is [out, in, *kernel], got shape {weight.shape}")
  return weight.transpose(*range(2, weight.ndim), 1, 0)


def torch_transposed_conv_kernel(weight: Any, *, flip: bool = False) -> np.ndarray:
  """``[I, O, *k]`` -> ``[*k, I, O]``, spatially flipped if ``flip`` (see the module docstring)."""
  weight = np.asarray(weight)
  if weight.ndim < 3:
    raise ValueError(
      f"a torch transposed-conv weight is [in, out, *kernel], got shape {weight.shape}"
    )
  if flip:
    weight = np.flip(weight, axis=tuple(range(2, weight.ndim)))
  return weight.transpose(*range(2, weight.ndim), 0, 1)


def torch_dense_kernel_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The torch Linear weight shape ``[O, I]`` for a Flax kernel shape ``[I, O]``."""
  return (flax_shape[1], flax_shape[0])


def torch_conv_kernel_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The torch conv weight shape ``[O, I, *k]`` for a Flax kernel shape ``[*k, I, O]``."""
  return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])


def torch_transposed_conv_kernel_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The torch transposed-conv weight shape ``[I, O, *k]`` for a Flax kernel ``[*k, I, O]``."""
  return (flax_shape[-2], flax_shape[-1], *flax_shape[:-2])
