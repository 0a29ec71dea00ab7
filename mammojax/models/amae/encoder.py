"""The encoder AMAE pretrains and its segmentation networks reuse: per-contrast tokens through the
Dynamic Convolution Tokenizer, one ViT over the tokens of every acquired contrast.

A volume ``[B, D, H, W, K]`` carries one channel per slot of the contrast vocabulary (a missing
contrast is a channel of zeros) and a presence mask ``[B, K]``. Every slot is tokenised by its own
effective filter (:class:`~mammojax.nn.dynamic_tokenizer.DynamicConvTokenizer`) into ``P``
patch tokens; the same 3-D position embedding is added at the same location of every contrast, and
a learned modality embedding per slot (``modality_embedding``; the seed adds "the positional and
modality embedding again" before the decoder, so the encoder's input has both). The tokens of all
slots (all ``P`` of each, or the visible subset ``keep``) form one sequence ``[B, K * n, E]``; a
key mask keeps the tokens of absent contrasts out of every token's attention, so a batch mixes
subjects with different contrast sets in one compiled program, and the set never changes the
program's shapes. Absent slots' tokens are zeros.

Defaults follow MONAI's ViT (what UNETR's encoder is): no class token (UNETR has none), no
query/key/value biases, LayerNorm epsilon 1e-5, so the pretrained blocks load into UNETR's ``vit``
unchanged. The position embedding is SelfMedMAE's fixed sin-cos table (``'sincos_hwd'``) by
default, or ``'learned'``.

Parameters: ``tokenizer/{kernel, bias, projector}``, ``modality_embedding`` ``[K, E]``,
``pos_embedding`` ``[1, P, E]`` (learned only), ``encoder_layer_{i}``, ``encoder_norm``
(:func:`mammojax.nn.vit.encoder_stack`'s names).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import partitioning
from mammojax.nn.dynamic_tokenizer import DynamicConvTokenizer, patch_grid
from mammojax.nn.vit import encoder_stack, sincos_position_embedding

ENCODER_POSITION_EMBEDDINGS = ("sincos_hwd", "sincos_whd", "learned")


def slot_token_mask(present: jax.Array, tokens_per_slot: int) -> jax.Array:
  """``[B, K] -> [B, K * n]`` bool: which tokens of a slot-major sequence belong to an acquired
  contrast."""
  present = jnp.asarray(present) > 0
  return jnp.repeat(present, tokens_per_slot, axis=1)


def key_mask(token_present: jax.Array) -> jax.Array:
  """``[B, L] -> [B, 1, 1, L]`` attention mask: every query attends to present keys only."""
  return token_present[:, None, None, :]


def position_table(
  module: nn.Module, kind: str, grid: Sequence[int], dim: int, name: str
) -> jax.Array:
  """``[1, P, dim]`` position embedding of a patch ``grid`` made in ``module``'s compact method:
  a fixed sin-cos table or a learned parameter ``name`` (normal 0.02)."""
  if kind not in ENCODER_POSITION_EMBEDDINGS:
    raise ValueError(f"position_embedding={kind!r}; use one of {ENCODER_POSITION_EMBEDDINGS}")
  count = 1
  for g in grid:
    count *= int(g)
  if kind == "learned":
    return module.param(
      name,
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), partitioning.TOKEN_AXES),
      (1, count, dim),
    )
  return jnp.asarray(sincos_position_embedding(grid, dim, kind))


class ContrastEncoder(nn.Module):
  """Tokenizer + ViT over the tokens of the acquired contrasts (see the module docstring).

  Attributes:
    num_slots: ``K``, the contrast vocabulary size.
    image_size: the crop sides ``(D, H, W)`` the model is built for.
    patch_size: patch side; divides every side.
    hidden_dim, depth, num_heads, mlp_dim: the ViT (ViT-B: 768, 12, 12, 3072).
    position_embedding: one of :data:`ENCODER_POSITION_EMBEDDINGS`.
    modality_embedding: add a learned embedding per slot to its tokens.
    tokenizer_update: the tokenizer's update rule (``'scale'``, ``'moddrop'``, ``'shift'``).
    qkv_bias: biases on the attention's query/key/value projections (MONAI: False).
    layer_norm_epsilon: of every LayerNorm (MONAI 1e-5).
    dropout_rate: dropout in the blocks and on the attention weights.
    remat: recompute each block in the backward pass.
    dtype: computation dtype (parameters float32).
  """

  num_slots: int
  image_size: tuple[int, ...]
  patch_size: int = 16
  hidden_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  position_embedding: str = "sincos_hwd"
  modality_embedding: bool = True
  tokenizer_update: str = "scale"
  qkv_bias: bool = False
  layer_norm_epsilon: float = 1e-5
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @property
  def grid(self) -> tuple[int, ...]:
    """The patch grid of an ``image_size`` crop."""
    return patch_grid(self.image_size, self.patch_size, "ContrastEncoder image_size")

  @property
  def num_patches(self) -> int:
    count = 1
    for g in self.grid:
      count *= g
    return count

  def check_inputs(self, volumes: jax.Array, present: jax.Array) -> None:
    """ValueError naming the shape and the fix for volumes / presence the model cannot take."""
    sides = tuple(int(s) for s in self.image_size)
    if volumes.ndim != len(sides) + 2 or volumes.shape[-1] != self.num_slots:
      raise ValueError(
        f"ContrastEncoder expects volumes [B, {', '.join(map(str, sides))}, {self.num_slots}] "
        f"(one channel per contrast of the vocabulary), got {volumes.shape}"
      )
    if tuple(volumes.shape[1:-1]) != sides:
      raise ValueError(
        f"ContrastEncoder: volumes of sides {tuple(volumes.shape[1:-1])}, but the model was "
        f"built for image_size={sides}; crop or pad to it (or use sliding windows)"
      )
    if present.shape != (volumes.shape[0], self.num_slots):
      raise ValueError(
        f"ContrastEncoder: contrast_present {present.shape} must be [B, K] = "
        f"{(volumes.shape[0], self.num_slots)}"
      )

  @nn.compact
  def __call__(
    self,
    volumes: jax.Array,
    present: jax.Array,
    *,
    keep: jax.Array | None = None,
    train: bool = False,
  ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
    """Args:
      volumes: ``[B, *image_size, K]``.
      present: ``[B, K]``, nonzero where the contrast was acquired.
      keep: optional ``[B, K, n]`` int patch indices per slot: only these tokens enter the
        encoder (the MAE's visible patches); None = all ``P``.
      train: dropout on.
    Returns:
      ``(tokens [B, K * n, E] after the final LayerNorm, the depth block outputs [B, K * n, E],
      token_present [B, K * n] bool)``, slot-major (slot 0's ``n`` tokens first).
    """
    self.check_inputs(volumes, present)
    tokens = DynamicConvTokenizer(
      self.num_slots,
      self.patch_size,
      self.hidden_dim,
      update=self.tokenizer_update,
      dtype=self.dtype,
      name="tokenizer",
    )(volumes, keep)  # [B, K, P or n, E]
    table = position_table(
      self, self.position_embedding, self.grid, self.hidden_dim, "pos_embedding"
    )[0]  # [P, E]
    # The same position at the same location of every contrast.
    position = table[None, None] if keep is None else table[keep]
    tokens = tokens + position.astype(tokens.dtype)
    if self.modality_embedding:
      modality = self.param(
        "modality_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, "mlp")),
        (self.num_slots, self.hidden_dim),
      )
      tokens = tokens + modality[None, :, None].astype(tokens.dtype)
    batch, slots, count = tokens.shape[:3]
    token_present = slot_token_mask(present, count)
    x = tokens.reshape(batch, slots * count, self.hidden_dim)
    x = jnp.where(token_present[..., None], x, 0).astype(tokens.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x, hidden_states = encoder_stack(
      self,
      x,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      deterministic=not train,
      mask=key_mask(token_present),
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.dropout_rate,
      layer_norm_epsilon=self.layer_norm_epsilon,
      qkv_bias=self.qkv_bias,
      remat=self.remat,
      dtype=self.dtype,
    )
    return x, hidden_states, token_present


def pool_over_contrasts(tokens: jax.Array, present: jax.Array, num_slots: int) -> jax.Array:
  """AMAE's adaptive max pooling over the contrast axis: ``[B, K * P, E] -> [B, P, E]``, the
  maximum over the acquired contrasts of each location (a subject without any gives zeros)."""
  batch, length, dim = tokens.shape
  per_slot = tokens.reshape(batch, num_slots, length // num_slots, dim)
  acquired = (jnp.asarray(present) > 0)[:, :, None, None]
  pooled = jnp.max(jnp.where(acquired, per_slot, -jnp.inf), axis=1)
  return jnp.where(jnp.any(acquired, axis=1), pooled, 0).astype(tokens.dtype)
