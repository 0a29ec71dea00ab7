"""Logical axis names of our parameters, for sharding rules (``nn.logical_to_mesh_axes``).

Every kernel carries names so that a mesh rule such as ``("mlp", "model")`` shards all models
alike: a dense kernel ``[in, out]`` is ``("embed", "mlp")``, a convolution kernel
``[*k, in, out]`` is ``(None, ..., "embed", "mlp")`` and a depthwise one ``[*k, 1, C]``
``(None, ..., None, "mlp")``; attention projections name their head axis ``"heads"``.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn

Initializer = nn.initializers.Initializer

DENSE_KERNEL_AXES = ("embed", "mlp")
BIAS_AXES = ("mlp",)
# Flax MultiHeadDotProductAttention: query/key/value kernels [D, heads, head_dim] and the output
# kernel [heads, head_dim, D].
ATTENTION_QKV_AXES = ("embed", "heads", None)
ATTENTION_OUT_AXES = ("heads", None, "embed")
# Learned token sets (Set Transformer inducing points and seeds), [1, N, D].
TOKEN_AXES = (None, None, "mlp")


def conv_kernel_axes(num_spatial_dims: int = 2) -> tuple[str | None, ...]:
  """``(None,) * n + ("embed", "mlp")`` for a ``[*k, in, out]`` kernel."""
  return (None,) * num_spatial_dims + ("embed", "mlp")


def depthwise_kernel_axes(num_spatial_dims: int = 2) -> tuple[str | None, ...]:
  """A depthwise kernel is ``[*k, 1, C]``: its channels are the output axis."""
  return (None,) * (num_spatial_dims + 1) + ("mlp",)


def dense_kernel_init(init: Initializer) -> Initializer:
  """``init`` for a dense kernel ``[in, out]``, named ``("embed", "mlp")``."""
  return nn.with_logical_partitioning(init, DENSE_KERNEL_AXES)


def conv_kernel_init(init: Initializer, num_spatial_dims: int = 2) -> Initializer:
  """``init`` for a convolution kernel ``[*k, in, out]`` (see :func:`conv_kernel_axes`)."""
  return nn.with_logical_partitioning(init, conv_kernel_axes(num_spatial_dims))


def depthwise_kernel_init(init: Initializer, num_spatial_dims: int = 2) -> Initializer:
  """``init`` for a depthwise kernel ``[*k, 1, C]``."""
  return nn.with_logical_partitioning(init, depthwise_kernel_axes(num_spatial_dims))


_LECUN_NORMAL = nn.initializers.lecun_normal()


def dense(
  features: int, name: str, kernel_init: Initializer = _LECUN_NORMAL, **kwargs: Any
) -> nn.Dense:
  """``nn.Dense`` with a named kernel (Flax's default init unless ``kernel_init``); ``kwargs``
  go to ``nn.Dense`` (dtype, use_bias, ...)."""
  return nn.Dense(features, name=name, kernel_init=dense_kernel_init(kernel_init), **kwargs)


# Token activations [B, N, D]: the batch over the data axes and, where a rule maps "tokens" (e.g.
# ("tokens", "model") for 3-D volumes of thousands of tokens), the sequence over devices.
TOKEN_ACTIVATION_AXES = ("batch", "tokens", None)


def with_token_sharding(tokens: Any) -> Any:
  """Constrains token activations ``[B, N, D]`` to :data:`TOKEN_ACTIVATION_AXES` under the
  active ``nn.logical_axis_rules`` and mesh; without them it returns ``tokens`` unchanged."""
  return nn.with_logical_constraint(tokens, TOKEN_ACTIVATION_AXES)
