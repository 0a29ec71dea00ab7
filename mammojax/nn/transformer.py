"""A transformer encoder block over token sequences: self-attention and an MLP, pre- or post-norm.

``pre_norm=True`` (ViT, UNETR's encoder)::

  x = x + drop(MHA(LN1(x)));  x = x + drop(MLP(LN2(x)))

``pre_norm=False`` (torch ``nn.TransformerEncoderLayer``'s default, BCRBench's temporal
attention)::

  x = LN1(x + drop(MHA(x)));  x = LN2(x + drop(MLP(x)))

with ``MLP(x) = ff_out(drop(activation(ff_in(x))))``. Attention is Flax's
``MultiHeadDotProductAttention`` (``attn/{query,key,value,out}``), with dropout on its weights
(``attention_dropout_rate``, not broadcast, as torch's ``nn.MultiheadAttention``). Parameters
start as torch's: ``xavier_uniform`` query/key/value (``in_proj_weight``), torch's Linear default
for the attention output and the MLP, zero biases.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
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
      return nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dropout_rate=self.attention_dropout_rate,
        broadcast_dropout=False,
        kernel_init=nn.with_logical_partitioning(
          initializers.torch_multihead_qkv_kernel, partitioning.ATTENTION_QKV_AXES
        ),
        out_kernel_init=nn.with_logical_partitioning(
          initializers.torch_default_kernel, partitioning.ATTENTION_OUT_AXES
        ),
        dtype=self.dtype,
        name="attn",
      )(x, x, mask=mask, deterministic=deterministic)

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
