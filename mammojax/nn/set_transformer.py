"""Set Transformer blocks (Lee et al. 2019): MAB, SAB, ISAB and PMA, with key masks.

The multihead attention block follows the paper's reference code, which FPN-MIL also uses:
``H = LN(Q' + softmax(Q' K'^T / sqrt(dim)) V')`` with the scores scaled by the FULL width ``dim``
(not the per-head width), then ``O = LN(H + relu(fc_o(H)))``; heads take contiguous slices of the
projected features. Masks are ``[B, N]`` booleans, True for real elements: masked keys get a large
negative score before the softmax, so padded elements never receive attention weight.

The ReLU after ``fc_o`` is injectable (``activation``). The block is not
:class:`mammojax.nn.transformer.TransformerBlock`: its attention scale, residual on the projected
queries and one-layer feed-forward differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.nn import partitioning

Activation = Callable[[jax.Array], jax.Array]


def masked_softmax(scores: jax.Array, mask: jax.Array | None, axis: int = -1) -> jax.Array:
  """Softmax of ``scores`` over ``axis`` with masked-out entries at exactly zero weight.

  ``mask`` broadcasts against ``scores`` (True = keep). The softmax runs in float32; a slice with
  no valid entry gets all-zero weights instead of NaN.
  """
  scores = scores.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(scores, axis=axis)
  big_negative = jnp.finfo(jnp.float32).min
  weights = jax.nn.softmax(jnp.where(mask, scores, big_negative), axis=axis)
  return jnp.where(mask, weights, 0.0)


class MAB(nn.Module):
  """Multihead attention block: queries [B, Nq, Dq] attend to keys [B, Nk, Dk].

  Attributes:
    features: width ``dim_V`` of the projections and the output.
    num_heads: heads; must divide ``features``.
    layer_norm: LayerNorm after each residual (``ln0``, ``ln1``).
    activation: after ``fc_o``.
  """

  features: int
  num_heads: int = 1
  layer_norm: bool = False
  activation: Activation = nn.relu

  @nn.compact
  def __call__(
    self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Returns (output [B, Nq, features], attention [B, heads, Nq, Nk])."""
    if self.features % self.num_heads:
      raise ValueError(
        f"MAB features={self.features} is not divisible by num_heads={self.num_heads}."
      )
    q = partitioning.dense(self.features, "fc_q")(queries)
    k = partitioning.dense(self.features, "fc_k")(keys)
    v = partitioning.dense(self.features, "fc_v")(keys)
    head_dim = self.features // self.num_heads

    def split(t: jax.Array) -> jax.Array:
      return t.reshape(t.shape[0], t.shape[1], self.num_heads, head_dim)

    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(self.features)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    attention = masked_softmax(scores, mask).astype(v.dtype)
    heads = split(q) + jnp.einsum("bhqk,bkhd->bqhd", attention, split(v))
    out = heads.reshape(q.shape)
    if self.layer_norm:
      out = nn.LayerNorm(epsilon=1e-5, name="ln0")(out)
    out = out + self.activation(partitioning.dense(self.features, "fc_o")(out))
    if self.layer_norm:
      out = nn.LayerNorm(epsilon=1e-5, name="ln1")(out)
    return out, attention


class SAB(nn.Module):
  """Set attention block: self-attention of the set onto itself."""

  features: int
  num_heads: int = 1
  layer_norm: bool = False
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[B, N, D] -> [B, N, features]; padded rows carry values but are never attended to."""
    out, _ = MAB(self.features, self.num_heads, self.layer_norm, self.activation, name="mab")(
      x, x, mask
    )
    return out


def num_inducing_points(num_instances: float) -> int:
  """Inducing points of an ISAB for bags of ``num_instances``: ceil(10 log10 n), or n if n <= 10.

  This is FPN-MIL's rule (e.g. 6 patches of 512 px: 6144 instances at scale 16 -> 38 points,
  1536 at 32 -> 32, 96 at 128 -> 20).
  """
  if num_instances <= 0:
    raise ValueError(f"num_instances must be positive, got {num_instances}.")
  if num_instances > 10:
    return int(math.ceil(10 * math.log10(num_instances)))
  return int(num_instances)


class ISAB(nn.Module):
  """Induced set attention block: m learned points attend to the set, the set attends back.

  Cost is O(N m) instead of O(N^2).
  """

  features: int
  num_inducing: int
  num_heads: int = 1
  layer_norm: bool = False
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[B, N, D] -> [B, N, features]."""
    inducing = self.param(
      "I",
      nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,)),
        partitioning.TOKEN_AXES,
      ),
      (1, self.num_inducing, self.features),
    )
    inducing = jnp.broadcast_to(inducing, (x.shape[0],) + inducing.shape[1:]).astype(x.dtype)
    mab = lambda name: MAB(  # noqa: E731
      self.features, self.num_heads, self.layer_norm, self.activation, name=name
    )
    h, _ = mab("mab0")(inducing, x, mask)
    out, _ = mab("mab1")(x, h)
    return out


class PMA(nn.Module):
  """Pooling by multihead attention with one learned seed vector.

  Returns (pooled [B, features], attention over instances [B, heads, N]).
  """

  features: int
  num_heads: int = 1
  layer_norm: bool = False
  activation: Activation = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    seed = self.param(
      "S",
      nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,)),
        partitioning.TOKEN_AXES,
      ),
      (1, 1, self.features),
    )
    seed = jnp.broadcast_to(seed, (x.shape[0], 1, self.features)).astype(x.dtype)
    out, attention = MAB(
      self.features, self.num_heads, self.layer_norm, self.activation, name="mab"
    )(seed, x, mask)
    return out[:, 0], attention[:, :, 0]
