"""Swin-transformer layers on channels-last 2D feature maps.

Window partition/reverse, window multi-head self-attention with a learned relative position
bias, the (shifted-)window block and a stage of alternating blocks, and patch expanding (a
stride-2 transposed convolution followed by LayerNorm). Shapes follow the video/volume Swin
variants used by registration networks: a feature map smaller than the window along an axis
uses a window as large as the map along that axis and no shift; a map that is not a multiple of
the window is zero-padded at the bottom/right (after ``norm1``) and the padded tokens take part
in attention unmasked, as in the original Swin code.

Parameter names (``norm1``, ``attn/qkv``, ``attn/proj``, ``attn/relative_position_bias_table``,
``norm2``, ``mlp/linear1``, ``mlp/linear2``, ``blocks_<i>``, ``up_conv``, ``norm``) mirror the
PyTorch registration code so checkpoints map one-to-one (see ``mammojax.convert``).

The block's token MLP is :func:`mammojax.nn.transformer.feed_forward`; its attention is not
:class:`~mammojax.nn.transformer.TransformerBlock`'s (windows, relative position bias, fused qkv).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.nn import initializers, partitioning
from mammojax.nn.conv_blocks import TransposedConvStride2
from mammojax.nn.transformer import feed_forward, gelu_exact

Activation = Callable[[jax.Array], jax.Array]

# PyTorch's defaults: LayerNorm eps, and the additive value masking tokens of other regions.
LAYER_NORM_EPS = 1e-5
MASKED_LOGIT = -100.0

_dense_init = partitioning.dense_kernel_init(initializers.torch_default_kernel)


def window_partition(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Cuts ``[B, H, W, C]`` into non-overlapping windows ``[B * nW, wh * ww, C]``.

  ``H`` and ``W`` must be multiples of the window; windows are ordered batch-major, then
  row-major over the window grid, tokens row-major inside a window.
  """
  batch, height, width, channels = x.shape
  wh, ww = window
  x = x.reshape(batch, height // wh, wh, width // ww, ww, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, channels)


def window_reverse(
  windows: jax.Array, window: Sequence[int], batch: int, height: int, width: int
) -> jax.Array:
  """Inverse of :func:`window_partition`: ``[B * nW, wh * ww, C]`` -> ``[B, H, W, C]``."""
  wh, ww = window
  x = windows.reshape(batch, height // wh, width // ww, wh, ww, -1)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def effective_window(
  size: Sequence[int], window: Sequence[int], shift: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Window and shift actually used on a map of ``size``: a map no larger than the window
  along an axis gets a window of the map's extent and no shift along that axis."""
  used_window = tuple(s if s <= w else w for s, w in zip(size, window))
  used_shift = tuple(0 if s <= w else sh for s, w, sh in zip(size, window, shift))
  return used_window, used_shift


def relative_position_index(window: Sequence[int]) -> np.ndarray:
  """Index into the bias table for every token pair of a window, ``[n, n]`` with
  ``n = wh * ww``: ``(dr + wh - 1) * (2 * ww - 1) + (dc + ww - 1)`` for the row/column offsets
  ``dr, dc`` of query minus key."""
  wh, ww = window
  rows, cols = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[:, None] - rows[None, :] + wh - 1
  d_col = cols[:, None] - cols[None, :] + ww - 1
  return (d_row * (2 * ww - 1) + d_col).astype(np.int64)


def shifted_window_mask(
  padded_size: Sequence[int], window: Sequence[int], shift: Sequence[int]
) -> np.ndarray:
  """Additive attention mask ``[nW, n, n]`` (0 or -100) for cyclically shifted windows.

  After rolling the map by ``-shift``, the last window along an axis holds tokens from two
  regions that are not neighbours in the image; tokens attend only within their own region.
  """
  labels = []
  for extent, w, s in zip(padded_size, window, shift):
    position = np.arange(extent)
    if s > 0:
      labels.append((position >= extent - w).astype(np.int64) + (position >= extent - s))
    else:  # No shift along this axis: every window is one region.
      labels.append(np.zeros(extent, np.int64))
  region = (labels[0][:, None] * 3 + labels[1][None, :])[None, :, :, None]
  region_windows = window_partition(region, window)[..., 0]  # [nW, n]
  differ = region_windows[:, :, None] != region_windows[:, None, :]
  return np.where(differ, MASKED_LOGIT, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a relative position bias.

  The bias table is sized for the configured ``window_size``. When a smaller window is in use
  (a small feature map), the bias is read from the top-left ``[n, n]`` block of the full-window
  index, exactly as the reference does; this is not the geometric relative position of the
  smaller window, but it is what trained checkpoints expect.
  """

  embed_dim: int
  num_heads: int
  window_size: tuple[int, int]
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, windows: jax.Array, mask: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Args:
      windows: ``[B * nW, n, C]`` tokens of each window.
      mask: ``[nW, n, n]`` additive mask or None.
    Returns:
      ``[B * nW, n, C]``.
    """
    num_windows_total, tokens, channels = windows.shape
    if channels % self.num_heads:
      raise ValueError(f"embed_dim {channels} is not divisible by num_heads {self.num_heads}")
    head_dim = channels // self.num_heads
    wh, ww = self.window_size
    table = self.param(
      "relative_position_bias_table",
      nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), (None, "heads")),
      ((2 * wh - 1) * (2 * ww - 1), self.num_heads),
    )
    qkv = nn.Dense(3 * channels, use_bias=self.qkv_bias, kernel_init=_dense_init, name="qkv")(
      windows
    )
    qkv = qkv.reshape(num_windows_total, tokens, 3, self.num_heads, head_dim)
    query, key, value = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [N, h, n, d]
    logits = jnp.einsum("nhqd,nhkd->nhqk", query * head_dim**-0.5, key)
    index = relative_position_index(self.window_size)[:tokens, :tokens]
    bias = table[index.reshape(-1)].reshape(tokens, tokens, self.num_heads)
    logits = logits + bias.transpose(2, 0, 1)[None]
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(-1, num_windows, self.num_heads, tokens, tokens)
      logits = logits + jnp.asarray(mask, logits.dtype)[None, :, None]
      logits = logits.reshape(-1, self.num_heads, tokens, tokens)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("nhqk,nhkd->nqhd", weights, value).reshape(num_windows_total, tokens, channels)
    return nn.Dense(channels, kernel_init=_dense_init, name="proj")(out)


class SwinMLP(nn.Module):
  """Token MLP: Dense -> exact GELU -> Dense (``linear1``, ``linear2``)."""

  hidden_dim: int
  activation: Activation = gelu_exact

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return feed_forward(
      x, self.hidden_dim, activation=self.activation, names=("linear1", "linear2")
    )


class SwinBlock(nn.Module):
  """Pre-norm (shifted-)window attention block with an MLP, both residual."""

  embed_dim: int
  num_heads: int
  window_size: tuple[int, int]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  activation: Activation = gelu_exact

  @nn.compact
  def __call__(
    self, x: jax.Array, window: tuple[int, int], shift: tuple[int, int], mask: np.ndarray | None
  ) -> jax.Array:
    """Args:
      x: ``[B, H, W, C]``.
      window: window in use on this map (see :func:`effective_window`).
      shift: cyclic shift in use; ``(0, 0)`` for a plain window block.
      mask: ``[nW, n, n]`` mask for the padded map, used only when ``shift`` is non-zero.
    Returns:
      ``[B, H, W, C]``.
    """
    batch, height, width, channels = x.shape
    h = nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name="norm1")(x)
    pad_rows, pad_cols = (-height) % window[0], (-width) % window[1]
    h = jnp.pad(h, ((0, 0), (0, pad_rows), (0, pad_cols), (0, 0)))
    padded_h, padded_w = height + pad_rows, width + pad_cols
    shifted = any(s > 0 for s in shift)
    if shifted:
      h = jnp.roll(h, (-shift[0], -shift[1]), axis=(1, 2))
    attention = WindowAttention(
      self.embed_dim, self.num_heads, tuple(self.window_size), self.qkv_bias, name="attn"
    )
    h = attention(window_partition(h, window), mask if shifted else None)
    h = window_reverse(h, window, batch, padded_h, padded_w)
    if shifted:
      h = jnp.roll(h, (shift[0], shift[1]), axis=(1, 2))
    x = x + h[:, :height, :width]
    h = nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name="norm2")(x)
    return x + SwinMLP(int(self.embed_dim * self.mlp_ratio), self.activation, name="mlp")(h)


class SwinStage(nn.Module):
  """``num_layers`` Swin blocks alternating plain and half-window-shifted windows."""

  embed_dim: int
  num_layers: int
  num_heads: int
  window_size: tuple[int, int]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  activation: Activation = gelu_exact

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, H, W, C]`` with ``C == embed_dim``."""
    if x.shape[-1] != self.embed_dim:
      raise ValueError(f"SwinStage expects {self.embed_dim} channels, got input {x.shape}")
    size = x.shape[1:3]
    half_shift = tuple(w // 2 for w in self.window_size)
    window, shift = effective_window(size, self.window_size, half_shift)
    padded = tuple(-(-s // w) * w for s, w in zip(size, window))
    mask = shifted_window_mask(padded, window, shift)
    for i in range(self.num_layers):
      block_shift = shift if i % 2 else (0, 0)
      x = SwinBlock(
        self.embed_dim,
        self.num_heads,
        tuple(self.window_size),
        self.mlp_ratio,
        self.qkv_bias,
        self.activation,
        name=f"blocks_{i}",
      )(x, window, block_shift, mask)
    return x


class PatchExpanding(nn.Module):
  """Doubles the resolution and halves the channels: ``up_conv`` then LayerNorm ``norm``."""

  embed_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, H, W, embed_dim]`` -> ``[B, 2H, 2W, embed_dim // 2]``."""
    x = TransposedConvStride2(self.embed_dim // 2, name="up_conv")(x)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name="norm")(x)
