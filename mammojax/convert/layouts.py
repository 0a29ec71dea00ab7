"""PyTorch -> Flax weight layouts (numpy only; torch is never imported here).

Torch stores channels first, Flax channels last:

* ``nn.Linear`` weight ``[O, I]`` -> ``nn.Dense`` kernel ``[I, O]``;
* ``nn.Conv{1,2,3}d`` weight ``[O, I / groups, *k]`` -> ``nn.Conv`` kernel ``[*k, I / groups, O]``
  (a depthwise ``[C, 1, *k]`` becomes ``[*k, 1, C]``);
* ``nn.ConvTranspose{1,2,3}d`` weight ``[I, O, *k]`` -> ``[*k, I, O]``; spatially flipped for
  Flax's ``nn.ConvTranspose``, which does not flip its kernel (torch's transposed convolution is
  the gradient of a correlation, i.e. a convolution with the flipped kernel), unflipped for
  :class:`mammojax.nn.conv_blocks.TransposedConvStride2`, which paints each input pixel's patch
  with the kernel as torch does;
* ``nn.MultiheadAttention`` ``in_proj_weight`` ``[3D, D]`` (query, key, value stacked on the
  first axis; timm's fused ``attn.qkv`` alike) and ``out_proj.weight`` ``[D, D]`` -> Flax
  ``MultiHeadDotProductAttention``'s ``{query,key,value}`` kernels ``[D, heads, D / heads]``,
  biases ``[heads, D / heads]`` and ``out`` kernel ``[heads, D / heads, D]``.

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


def torch_attention_params(
  in_weight: Any,
  in_bias: Any,
  out_weight: Any,
  out_bias: Any,
  num_heads: int,
  *,
  name: str = "in_proj_weight",
) -> dict[str, dict[str, np.ndarray]]:
  """Fused torch attention projections -> Flax ``MultiHeadDotProductAttention`` params.

  Args:
    in_weight: ``[3D, D]``, the query, key and value Linear weights stacked in that order.
    in_bias: ``[3D]``.
    out_weight: ``[D, D]``, the output Linear weight.
    out_bias: ``[D]``.
    num_heads: attention heads (not recorded in the weights); must divide ``D``.
    name: the checkpoint key of ``in_weight``, for the error message.
  Returns:
    ``{'query', 'key', 'value': {'kernel' [D, heads, D / heads], 'bias' [heads, D / heads]},
    'out': {'kernel' [heads, D / heads, D], 'bias' [D]}}`` (views where numpy allows).
  Raises:
    ValueError: a malformed shape, or ``num_heads`` not dividing ``D``.
  """
  in_weight, in_bias = np.asarray(in_weight), np.asarray(in_bias)
  out_weight, out_bias = np.asarray(out_weight), np.asarray(out_bias)
  dim = in_weight.shape[1] if in_weight.ndim == 2 else -1
  if in_weight.shape != (3 * dim, dim) or num_heads < 1 or dim % num_heads:
    raise ValueError(
      f"{name} has shape {in_weight.shape}; expected [3D, D] with "
      f"D divisible by num_heads={num_heads}"
    )
  if in_bias.shape != (3 * dim,) or out_weight.shape != (dim, dim) or out_bias.shape != (dim,):
    raise ValueError(
      f"attention weights beside {name} have shapes in_bias {in_bias.shape}, out weight "
      f"{out_weight.shape}, out bias {out_bias.shape}; expected ({3 * dim},), ({dim}, {dim}), "
      f"({dim},)"
    )
  head_dim = dim // num_heads
  params = {}
  for index, projection in enumerate(("query", "key", "value")):
    rows = slice(index * dim, (index + 1) * dim)
    params[projection] = {
      "kernel": torch_dense_kernel(in_weight[rows]).reshape(dim, num_heads, head_dim),
      "bias": in_bias[rows].reshape(num_heads, head_dim),
    }
  params["out"] = {
    "kernel": torch_dense_kernel(out_weight).reshape(num_heads, head_dim, dim),
    "bias": out_bias,
  }
  return params


def torch_dense_kernel_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The torch Linear weight shape ``[O, I]`` for a Flax kernel shape ``[I, O]``."""
  return (flax_shape[1], flax_shape[0])


def torch_conv_kernel_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The torch conv weight shape ``[O, I, *k]`` for a Flax kernel shape ``[*k, I, O]``."""
  return (flax_shape[-1], flax_shape[-2], *flax_shape[:-2])


def torch_transposed_conv_kernel_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The torch transposed-conv weight shape ``[I, O, *k]`` for a Flax kernel ``[*k, I, O]``."""
  return (flax_shape[-2], flax_shape[-1], *flax_shape[:-2])
