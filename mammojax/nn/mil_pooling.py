"""Masked multiple-instance learning layers: instance encoders and bag pooling.

Bags are ``[B, N, D]`` with a mask ``[B, N]`` (True = real instance), so bags of different sizes
batch together. Padded instances never receive pooling weight and never change a bag's output.

Instance encoders (``InstanceEncoder``): 'mlp' (Dense + ReLU + dropout), 'sab' and 'isab' (Set
Transformer blocks). Pooling (``make_pooling``): 'mean', 'max', 'attention' (Ilse et al. 2018,
``a = w^T tanh(V h)``), 'gated-attention' (``a = w^T (tanh(V h) * sigmoid(U h))``), 'pma'. Every
pooling module maps ``(x [B, N, D], mask [B, N] | None, deterministic)`` to
``(pooled [B, D'], weights [B, N] | None)``; weights are the per-instance attention (averaged over
heads for PMA) and None for mean and max.

The ReLU of the MLP encoder and of the Set Transformer blocks is injectable (``activation``); the
tanh / sigmoid of attention scoring is part of the pooling and stays.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mammojax.nn.partitioning import dense
from mammojax.nn.set_transformer import ISAB, PMA, SAB, masked_softmax

ENCODER_TYPES = ("mlp", "sab", "isab")
POOLING_TYPES = ("mean", "max", "attention", "gated-attention", "pma")

Activation = Callable[[jax.Array], jax.Array]


def check_bag(x: jax.Array, mask: jax.Array | None) -> None:
  """Raises a ValueError naming the shapes when ``x`` is not [B, N, D] or ``mask`` not [B, N]."""
  if x.ndim != 3:
    raise ValueError(f"MIL bags must be [B, N, D], got shape {x.shape}.")
  if mask is not None and mask.shape != x.shape[:2]:
    raise ValueError(f"MIL mask must be [B, N] = {x.shape[:2]} matching the bag, got {mask.shape}.")


class InstanceEncoder(nn.Module):
  """Per-instance (MLP) or set-aware (SAB / ISAB) encoding of a bag.

  Attributes:
    kind: 'mlp', 'sab' or 'isab'.
    features: output width (the reference's ``fcl_encoder_dim``, 256).
    num_blocks: stacked SAB / ISAB blocks (ignored for 'mlp', which is one layer).
    num_heads: attention heads of SAB / ISAB.
    num_inducing: inducing points of ISAB (see `set_transformer.num_inducing_points`).
    layer_norm: LayerNorm inside SAB / ISAB.
    dropout: dropout after the MLP's ReLU.
    activation: the MLP's ReLU, or the one inside each SAB / ISAB block.
  """

  kind: str = "mlp"
  features: int = 256
  num_blocks: int = 2
  num_heads: int = 4
  num_inducing: int = 16
  layer_norm: bool = False
  dropout: float = 0.0
  activation: Activation = nn.relu

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """[B, N, D] -> [B, N, features]."""
    check_bag(x, mask)
    if self.kind == "mlp":
      x = self.activation(dense(self.features, "fc")(x))
      return nn.Dropout(self.dropout)(x, deterministic=deterministic)
    if self.kind == "sab":
      for i in range(self.num_blocks):
        x = SAB(
          self.features, self.num_heads, self.layer_norm, self.activation, name=f"blocks_{i}"
        )(x, mask)
      return x
    if self.kind == "isab":
      for i in range(self.num_blocks):
        x = ISAB(
          self.features,
          self.num_inducing,
          self.num_heads,
          self.layer_norm,
          self.activation,
          name=f"blocks_{i}",
        )(x, mask)
      return x
    raise ValueError(f"InstanceEncoder kind must be one of {ENCODER_TYPES}, got {self.kind!r}.")


class ReductionPooling(nn.Module):
  """Parameter-free pooling over the valid instances: their feature-wise ``'mean'`` or ``'max'``
  (zeros for a bag with none)."""

  reduction: str = "mean"

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
  ) -> tuple[jax.Array, None]:
    """``x [B, N, D]``, ``mask [B, N]`` -> ``([B, D], None)`` (no attention weights)."""
    check_bag(x, mask)
    if self.reduction == "mean":
      if mask is None:
        return jnp.mean(x, axis=1), None
      weights = mask.astype(x.dtype)[..., None]
      return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0), None
    if self.reduction == "max":
      if mask is None:
        return jnp.max(x, axis=1), None
      valid = mask[..., None]
      pooled = jnp.max(jnp.where(valid, x, jnp.finfo(x.dtype).min), axis=1)
      return jnp.where(jnp.any(valid, axis=1), pooled, 0.0), None
    raise ValueError(f"reduction must be 'mean' or 'max', got {self.reduction!r}")


class AttentionPooling(nn.Module):
  """Attention MIL pooling (Ilse et al. 2018), optionally gated.

  Scores ``w^T tanh(V h)`` or, gated, ``w^T (tanh(V h) * sigmoid(U h))``, with dropout after the
  tanh and the sigmoid branches; softmax over the valid instances; output ``sum_n a_n h_n``.

  Attributes:
    hidden: width of V and U (the reference's ``fcl_attention_dim``, 128).
    gated: use the sigmoid gate U.
    dropout: dropout rate inside the scoring network.
  """

  hidden: int = 128
  gated: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    check_bag(x, mask)
    a = nn.Dropout(self.dropout)(
      jnp.tanh(dense(self.hidden, "attention_V")(x)), deterministic=deterministic
    )
    if self.gated:
      gate = nn.Dropout(self.dropout)(
        nn.sigmoid(dense(self.hidden, "attention_U")(x)), deterministic=deterministic
      )
      a = a * gate
    scores = dense(1, "attention_weights")(a)[..., 0]
    weights = masked_softmax(scores, mask).astype(x.dtype)
    return jnp.einsum("bn,bnd->bd", weights, x), weights


class PMAPooling(nn.Module):
  """Set Transformer pooling by multihead attention with one seed; weights averaged over heads."""

  features: int = 256
  num_heads: int = 1
  layer_norm: bool = False
  activation: Activation = nn.relu

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    check_bag(x, mask)
    pooled, attention = PMA(
      self.features, self.num_heads, self.layer_norm, self.activation, name="pma"
    )(x, mask)
    return pooled, jnp.mean(attention, axis=1)


def make_pooling(
  kind: str,
  *,
  features: int,
  attention_hidden: int = 128,
  dropout: float = 0.0,
  num_heads: int = 1,
  layer_norm: bool = False,
  activation: Activation = nn.relu,
  name: str | None = None,
) -> nn.Module:
  """Builds the pooling module ``kind`` (one of `POOLING_TYPES`) for bags of width ``features``.

  ``activation`` is the ReLU inside PMA's block; the other kinds have none.
  """
  if kind in ("mean", "max"):
    return ReductionPooling(kind, name=name)
  if kind in ("attention", "gated-attention"):
    return AttentionPooling(
      attention_hidden, gated=kind == "gated-attention", dropout=dropout, name=name
    )
  if kind == "pma":
    return PMAPooling(features, num_heads, layer_norm, activation, name=name)
  raise ValueError(f"pooling type must be one of {POOLING_TYPES}, got {kind!r}.")
