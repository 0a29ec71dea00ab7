"""A transformer encoder block over token sequences: self-attention and an MLP, pre- or post-norm.

``pre_norm=True`` (ViT, UNETR's encoder)::

  x = x + drop(MHA(LN1(x)));  x = x + drop(MLP(LN2(x)))

``pre_norm=False`` (torch ``nn.TransformerEncoderLayer``'s default, BCRBench's temporal
attention)::

  x = LN1(x + drop(MHA(x)));  x = LN2(x + drop(MLP(x)))

with ``MLP(x) = ff_out(drop(activation(ff_in(x))))``. Attention (``attn/{query,key,value,out}``) has dropout on its weights
(``attention_dropout_rate``, not broadcast, as torch's ``nn.MultiheadAttention``). Parameters
start as torch's: ``xavier_uniform`` query/key/value (``in_proj_weight``), torch's Linear default
for the attention output and the MLP, zero biases.

Attention is :class:`SelfAttention`, which keeps the parameter layout of Flax's
``MultiHeadDotProductAttention`` (``attn/{query,key,value}`` kernels ``[D, heads, D / heads]``,
``attn/out`` ``[heads, D / heads, D]``) but lets the query/key/value projections go without a
bias while the output projection keeps one (``qkv_bias=False``, as MONAI's ``SABlock``); Flax's
module has one ``use_bias`` for all four, which would add unused parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.nn import initializers, partitioning

Activation = Callable[[jax.Array], jax.Array]


def gelu_exact(x: jax.Array) -> jax.Array:
  """torch's ``nn.GELU()`` (erf form; Flax's ``nn.gelu`` defaults to the tanh approximation)."""
  return nn.gelu(x, approximate=False)


def feed_forward(
  x: jax.Array,
  hidden_dim: int,
  *,
  activation: Activation,
  names: tuple[str, str],
  dropout_rate: float = 0.0,
  deterministic: bool = True,
  kernel_init: nn.initializers.Initializer = initializers.torch_default_kernel,
  dtype: jnp.dtype | None = None,
) -> jax.Array:
  """Token MLP ``Dense(hidden) -> activation -> dropout -> Dense(D)``: ``[..., D] -> [..., D]``.

  Call it inside a compact method: the two ``nn.Dense`` layers are created in the CALLING
  module under ``names`` (e.g. ``('ff_in', 'ff_out')``), so models keep their checkpoint names.
  """
  dense = lambda features, name: partitioning.dense(  # noqa: E731
    features, name, kernel_init=kernel_init, dtype=dtype
  )
  hidden = activation(dense(hidden_dim, names[0])(x))
  hidden = nn.Dropout(dropout_rate)(hidden, deterministic=deterministic)
  return dense(x.shape[-1], names[1])(hidden)


def _flat_init(init: nn.initializers.Initializer, in_rank: int) -> nn.initializers.Initializer:
  """``init`` drawn on the 2-D ``[prod(in axes), prod(out axes)]`` view and reshaped, as Flax's
  ``DenseGeneral`` draws (same fans, same values for the same key)."""

  def flat(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    rows = int(np.prod(shape[:in_rank]))
    return init(key, (rows, int(np.prod(shape[in_rank:]))), dtype).reshape(shape)

  return flat


class _Projection(nn.Module):
  """``y = x . kernel (+ bias)`` contracting the last ``len(kernel_shape) - len(features)`` axes
  of ``x``: Flax ``DenseGeneral``'s parameter layout with the logical axes on the full kernel
  shape (``DenseGeneral`` boxes the flat 2-D draw, which breaks under sharding rules)."""

  features: tuple[int, ...]
  in_rank: int
  axes: tuple[str | None, ...]
  init: nn.initializers.Initializer
  use_bias: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_rank :]
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(_flat_init(self.init, self.in_rank), self.axes),
      (*in_shape, *self.features),
    )
    dtype = self.dtype or jnp.result_type(x, kernel)
    contract = tuple(range(x.ndim - self.in_rank, x.ndim))
    y = jax.lax.dot_general(
      x.astype(dtype), kernel.astype(dtype), ((contract, tuple(range(self.in_rank))), ((), ()))
    )
    if self.use_bias:
      bias_axes = self.axes[self.in_rank :]
      bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes), self.features
      )
      y = y + bias.astype(dtype)
    return y


class SelfAttention(nn.Module):
  """Multi-head self-attention ``[B, S, D] -> [B, S, D]`` (see the module docstring).

  Attributes:
    num_heads: attention heads; must divide ``D``.
    qkv_bias: biases on the query/key/value projections (the output projection always has one).
    dropout_rate: dropout on the attention weights (not broadcast).
    dtype: computation dtype.
  Submodules: ``query``, ``key``, ``value`` (kernels ``[D, heads, D / heads]``), ``out``
  (``[heads, D / heads, D]``).
  """

  num_heads: int
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(
    self, tokens: jax.Array, *, deterministic: bool, mask: jax.Array | None = None
  ) -> jax.Array:
    dim = tokens.shape[-1]
    if dim % self.num_heads:
      raise ValueError(
        f"SelfAttention: width {dim} is not a multiple of num_heads={self.num_heads}"
      )
    heads = (self.num_heads, dim // self.num_heads)
    query, key, value = (
      _Projection(
        heads,
        in_rank=1,
        axes=partitioning.ATTENTION_QKV_AXES,
        init=initializers.torch_multihead_qkv_kernel,
        use_bias=self.qkv_bias,
        dtype=self.dtype,
        name=name,
      )(tokens)
      for name in ("query", "key", "value")
    )
    use_dropout = self.dropout_rate > 0.0 and not deterministic
    mixed = nn.dot_product_attention(
      query,
      key,
      value,
      mask=mask,
      dropout_rng=self.make_rng("dropout") if use_dropout else None,
      dropout_rate=self.dropout_rate,
      broadcast_dropout=False,
      deterministic=not use_dropout,
      dtype=self.dtype,
    )
    return _Projection(
      (dim,),
      in_rank=2,
      axes=partitioning.ATTENTION_OUT_AXES,
      init=initializers.torch_default_kernel,
      dtype=self.dtype,
      name="out",
    )(mixed)


class TransformerBlock(nn.Module):
  """Self-attention + MLP block: ``[B, S, D] -> [B, S, D]`` (see the module docstring).

  Attributes:
    num_heads: attention heads; must divide ``D``.
    mlp_dim: MLP hidden width; ``None`` = ``int(D * mlp_ratio)``.
    mlp_ratio: hidden width factor when ``mlp_dim`` is None.
    pre_norm: LayerNorm before each branch (True) or after each residual sum (False).
    activation: MLP activation (default torch's exact GELU); replace it to change the
      gradient (e.g. guided backpropagation) without editing the model.
    attention_dropout_rate: dropout on the attention weights.
    dropout_rate: dropout after the MLP activation and on both branch outputs.
    layer_norm_epsilon: 1e-5 as torch's LayerNorm (timm's ViT: 1e-6).
    qkv_bias: biases on the query/key/value projections (torch and timm: True; MONAI: False).
    dtype: computation dtype.
  Submodules: ``attn``, ``norm1``, ``norm2``, ``ff_in``, ``ff_out``.
  """

  num_heads: int = 8
  mlp_dim: int | None = None
  mlp_ratio: float = 4.0
  pre_norm: bool = True
  activation: Activation = gelu_exact
  attention_dropout_rate: float = 0.0
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-5
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, tokens: jax.Array, deterministic: bool, mask: jax.Array | None = None
  ) -> jax.Array:
    """Args:
      tokens: ``[B, S, D]``.
      deterministic: no dropout (else a ``'dropout'`` rng is needed).
      mask: optional ``[B, 1 or heads, S, S]`` boolean attention mask, True = attend.
    Returns:
      ``[B, S, D]``.
    """
    if tokens.ndim != 3:
      raise ValueError(f"TransformerBlock expects tokens [B, S, D], got {tokens.shape}")
    dim = tokens.shape[-1]
    # Two-pass variance, as torch: the fast one loses digits on features with a large mean.
    layer_norm = lambda name: nn.LayerNorm(  # noqa: E731
      epsilon=self.layer_norm_epsilon, use_fast_variance=False, dtype=self.dtype, name=name
    )
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)  # noqa: E731

    def attention(x: jax.Array) -> jax.Array:
      return SelfAttention(
        num_heads=self.num_heads,
        qkv_bias=self.qkv_bias,
        dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype,
        name="attn",
      )(x, deterministic=deterministic, mask=mask)

    def mlp(x: jax.Array) -> jax.Array:
      hidden = self.mlp_dim or int(dim * self.mlp_ratio)
      return feed_forward(
        x,
        hidden,
        activation=self.activation,
        names=("ff_in", "ff_out"),
        dropout_rate=self.dropout_rate,
        deterministic=deterministic,
        dtype=self.dtype,
      )

    if self.pre_norm:
      x = tokens + drop(attention(layer_norm("norm1")(tokens)))
      return x + drop(mlp(layer_norm("norm2")(x)))
    x = layer_norm("norm1")(tokens + drop(attention(tokens)))
    return layer_norm("norm2")(x + drop(mlp(x)))
