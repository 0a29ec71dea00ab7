"""Vision Transformer (ViT, Dosovitskiy et al. 2021), ViT-B/16 by default, channels-last.

Layout, as torchvision's ``vit_b_16`` and timm's ``vit_base_patch16_224`` build it:

* ``conv_proj``: a convolution with kernel = stride = ``patch_size`` and a bias cuts the image
  into a grid of patch embeddings ``[B, h, w, D]`` (the number of spatial axes follows the
  input: 2D images now, volumes ``[B, D, H, W, C]`` alike), flattened row-major into ``N``
  tokens;
* ``class_token`` ``[1, 1, D]`` is prepended (``class_token=True``), then the learned
  ``pos_embedding`` ``[1, 1 + N, D]`` is added, then dropout;
* ``encoder_layer_{i}``: ``depth`` pre-norm :class:`~mammojax.nn.transformer.TransformerBlock`
  (``x + MHA(LN(x))``, ``x + MLP(LN(x))``, exact GELU);
* ``encoder_norm``: a final LayerNorm on every token;
* the class token (or, with ``class_token=False``, the mean of the normalised tokens) is the
  feature ``[B, D]``; with ``num_classes > 0`` a Dense ``head`` turns it into logits.

LayerNorm epsilon is 1e-6 (torchvision and timm both).

The same module is the encoder of MONAI-style 3-D models (UNETR, the masked autoencoder):
``repeat_grayscale=False`` takes any number of input channels as they are; ``image_size`` may be
a tuple of per-axis sides; ``position_embedding`` is ``'learned'`` (a parameter), a fixed
sin-cos table (``'sincos_whd'``: MONAI's ``build_sincos_position_embedding``, whose frequency
blocks run over the grid axes in the order 1, 0, 2 -- "w, h, d" in its names; ``'sincos_hwd'``:
SelfMedMAE's order 0, 1, 2) or ``'none'``; ``qkv_bias=False`` as MONAI's attention; ``remat``
recomputes each block in the backward pass (memory for 3-D token counts). ``return_tokens=True``
returns the normalised tokens and every block's output (UNETR taps blocks 3, 6 and 9). Checkpoint names, ours / torchvision /
timm (:mod:`mammojax.convert.vit` imports both):

* ``conv_proj``: ``conv_proj`` / ``patch_embed.proj``;
* ``class_token``: ``class_token`` / ``cls_token``;
* ``pos_embedding``: ``encoder.pos_embedding`` / ``pos_embed``;
* ``encoder_layer_{i}/{norm1, attn, norm2, ff_in, ff_out}``:
  ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention (in_proj_*, out_proj), ln_2, mlp.0,
  mlp.3}`` / ``blocks.{i}.{norm1, attn (qkv, proj), norm2, mlp.fc1, mlp.fc2}``;
* ``encoder_norm``: ``encoder.ln`` / ``norm``;
* ``head``: ``heads.head`` / ``head``.

Intermediates are sown into the ``'intermediates'`` collection when the caller makes it mutable
(``apply(..., mutable=['intermediates'])``), each a tuple with one entry per call, under
:func:`vit_intermediate_names` (``VIT_INTERMEDIATE_NAMES``): ``conv_proj_out`` (the patch grid
``[B, h, w, D]``), ``encoder_layer_{i}_out`` (block ``i``'s output tokens ``[B, 1 + N, D]``)
and ``encoder_norm_out`` (``[B, 1 + N, D]``). A sown name cannot be its module's own name: Flax
keeps one namespace per module for submodules and variables of every collection. Token layers
become maps with :func:`tokens_to_grid`. Each sown value also passes through Flax's ``perturb``
under the same name (:func:`mammojax.nn.intermediates.expose`), so that gradients with respect to it can be taken without
hooks (:mod:`mammojax.interpret`).

Gradient caveat (GradCAM and relatives): only the class token of the LAST block's output reaches
the class-token feature, so gradients on the patch tokens of ``encoder_layer_{depth-1}_out`` and
``encoder_norm_out`` are exactly zero; take an earlier block (e.g. ``encoder_layer_{depth-2}``),
whose patch tokens the last block's attention mixes into the class token. With
``class_token=False`` (mean pooling) every layer receives gradient.

Parameters start as torchvision's where it is cheap: patch conv LeCun normal (truncated, fan-in
variance 1/fan_in), zero biases, ``class_token`` zeros, ``pos_embedding`` normal(0.02), head
zeros; the blocks keep :class:`TransformerBlock`'s torch ``nn.MultiheadAttention`` init. The
activation is injectable (``activation``), e.g. for guided backpropagation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.nn import partitioning
from mammojax.nn.intermediates import expose
from mammojax.nn.transformer import TransformerBlock, gelu_exact

Activation = Callable[[jax.Array], jax.Array]

# variance_scaling(1, fan_in, truncated_normal): torchvision's trunc_normal(std=sqrt(1/fan_in)).
_patch_init = nn.initializers.lecun_normal()


def _sown_name(module: str) -> str:
  """The intermediates key of a module's output (see the module docstring)."""
  return f"{module}_out"


def vit_intermediate_names(depth: int) -> tuple[str, ...]:
  """Sown intermediate names of a ``depth``-block ViT, input to output.

  ``conv_proj_out`` (``[B, h, w, D]``), ``encoder_layer_{i}_out`` for ``i < depth`` and
  ``encoder_norm_out`` (``[B, 1 + N, D]``).
  """
  modules = ("conv_proj", *(f"encoder_layer_{i}" for i in range(depth)), "encoder_norm")
  return tuple(_sown_name(module) for module in modules)


VIT_INTERMEDIATE_NAMES = vit_intermediate_names


POSITION_EMBEDDINGS = ("learned", "sincos_whd", "sincos_hwd", "none")
# Grid-axis order of the sin-cos frequency blocks, per named convention (see the module docstring).
_SINCOS_AXIS_ORDER = {
  "sincos_whd": {2: (1, 0), 3: (1, 0, 2)},
  "sincos_hwd": {2: (0, 1), 3: (0, 1, 2)},
}


def sincos_position_embedding(
  grid: Sequence[int], dim: int, order: str = "sincos_whd", temperature: float = 10000.0
) -> np.ndarray:
  """Fixed sin-cos position table ``[1, prod(grid), dim]`` over a 2-D or 3-D patch grid.

  For each grid axis ``a`` (in the convention's order) the block ``[sin(p_a * w), cos(p_a * w)]``
  with ``w_j = temperature ** (-j / (dim / (2 * ndim)))``, ``j < dim / (2 * ndim)``; positions
  are the integer patch indices, tokens in row-major grid order.

  Args:
    grid: patch grid, e.g. ``(6, 6, 6)``.
    dim: token width; a multiple of ``2 * len(grid)``.
    order: ``'sincos_whd'`` (MONAI) or ``'sincos_hwd'`` (SelfMedMAE).
    temperature: frequency base.
  """
  grid = tuple(int(g) for g in grid)
  if order not in _SINCOS_AXIS_ORDER or len(grid) not in _SINCOS_AXIS_ORDER[order]:
    raise ValueError(
      f"sin-cos position embedding: order {order!r} over a {len(grid)}-D grid is not defined; "
      f"use one of {sorted(_SINCOS_AXIS_ORDER)} over a 2-D or 3-D grid"
    )
  if dim % (2 * len(grid)):
    raise ValueError(
      f"sin-cos position embedding over a {len(grid)}-D grid needs a width that is a multiple of "
      f"{2 * len(grid)}, got hidden_dim={dim}"
    )
  per_axis = dim // (2 * len(grid))
  omega = 1.0 / temperature ** (np.arange(per_axis, dtype=np.float32) / per_axis)
  positions = np.meshgrid(*(np.arange(g, dtype=np.float32) for g in grid), indexing="ij")
  blocks = []
  for axis in _SINCOS_AXIS_ORDER[order][len(grid)]:
    angles = positions[axis].reshape(-1, 1) * omega[None]
    blocks += [np.sin(angles), np.cos(angles)]
  return np.concatenate(blocks, axis=1)[None].astype(np.float32)


def tokens_to_grid(tokens: jax.Array, grid: Sequence[int], class_token: bool = True) -> jax.Array:
  """Token sequence -> patch map: ``[B, 1 + N, D]`` -> ``[B, h, w, D]``.

  Args:
    tokens: ``[B, 1 + N, D]`` (``[B, N, D]`` when ``class_token`` is False).
    grid: the patch grid ``(h, w)`` (any number of axes, e.g. ``(d, h, w)``), ``N = h * w``.
    class_token: whether the first token is the class token (dropped).
  Returns:
    ``[B, h, w, D]``, patches in the row-major order ``conv_proj`` flattened them.
  """
  if class_token:
    tokens = tokens[:, 1:]
  grid = tuple(int(g) for g in grid)
  count = 1
  for g in grid:
    count *= g
  if tokens.ndim != 3 or tokens.shape[1] != count:
    raise ValueError(
      f"tokens of shape {tokens.shape} (class token {'dropped' if class_token else 'absent'}) "
      f"do not fill a patch grid {grid} of {count} tokens"
    )
  return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1])


def encoder_stack(
  module: nn.Module,
  tokens: jax.Array,
  *,
  depth: int,
  num_heads: int,
  mlp_dim: int,
  deterministic: bool,
  mask: jax.Array | None = None,
  activation: Activation = gelu_exact,
  dropout_rate: float = 0.0,
  attention_dropout_rate: float = 0.0,
  layer_norm_epsilon: float = 1e-6,
  qkv_bias: bool = True,
  remat: bool = False,
  dtype: jnp.dtype = jnp.float32,
  prefix: str = "encoder",
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The ViT's pre-norm blocks and final LayerNorm over ``tokens [B, S, D]``.

  Call it inside ``module``'s compact method: the blocks ``{prefix}_layer_{i}`` and the norm
  ``{prefix}_norm`` are created in ``module`` (so every model that runs a ViT encoder this way,
  the ViT itself, UNETR's and the masked autoencoder's, shares the checkpoint names), and their
  outputs are sown there under ``{name}_out``.

  Args:
    mask: optional boolean attention mask broadcastable to ``[B, heads, S, S]`` (True = attend),
      e.g. ``[B, 1, 1, S]`` to keep padding tokens out of every token's attention.
    remat: recompute each block in the backward pass.
  Returns:
    ``(normed [B, S, D], block outputs: depth x [B, S, D])``.
  """
  # static_argnums counts self: argument 2 is `deterministic`.
  block = nn.remat(TransformerBlock, static_argnums=(2,)) if remat else TransformerBlock
  hidden_states = []
  x = tokens
  for i in range(depth):
    name = f"{prefix}_layer_{i}"
    x = block(
      num_heads=num_heads,
      mlp_dim=mlp_dim,
      pre_norm=True,
      activation=activation,
      attention_dropout_rate=attention_dropout_rate,
      dropout_rate=dropout_rate,
      layer_norm_epsilon=layer_norm_epsilon,
      qkv_bias=qkv_bias,
      dtype=dtype,
      name=name,
    )(x, deterministic, mask)
    x = partitioning.with_token_sharding(x)
    x = expose(module, _sown_name(name), x)
    hidden_states.append(x)
  x = nn.LayerNorm(
    epsilon=layer_norm_epsilon, use_fast_variance=False, dtype=dtype, name=f"{prefix}_norm"
  )(x)
  x = expose(module, _sown_name(f"{prefix}_norm"), x)
  return x, tuple(hidden_states)


class VisionTransformer(nn.Module):
  """ViT: ``[B, H, W, 1 or 3] -> [B, D]`` features or ``[B, num_classes]`` logits.

  Attributes:
    image_size: side of the (square, or cubic for volumes) image the model is built for, or one
      side per spatial axis; sizes ``pos_embedding`` (torchvision's ``image_size``; 224 for
      ViT-B/16).
    patch_size: patch side; must divide ``image_size``.
    hidden_dim: token width ``D``.
    depth: transformer blocks.
    num_heads: attention heads; must divide ``D``.
    mlp_dim: MLP hidden width of each block.
    num_classes: 0 = return the features ``[B, D]``; > 0 = a Dense ``head`` -> logits.
    class_token: prepend a learned class token and return it; False = mean-pool the tokens.
    layer_norm_epsilon: of every LayerNorm (1e-6 as torchvision and timm).
    dropout_rate: after the position embedding, and inside the blocks.
    attention_dropout_rate: on the attention weights.
    dtype: computation dtype (parameters stay float32).
    activation: MLP activation (torch's exact GELU).
    repeat_grayscale: repeat a 1-channel input to 3 channels (ImageNet weights); False takes any
      channel count as it is (MONAI's ``in_channels``).
    position_embedding: one of ``POSITION_EMBEDDINGS`` (see the module docstring).
    qkv_bias: biases on the attention's query/key/value projections (MONAI: False).
    remat: recompute each block's activations in the backward pass instead of storing them.
  """

  image_size: int | tuple[int, ...] = 224
  patch_size: int = 16
  hidden_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 0
  class_token: bool = True
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  activation: Activation = gelu_exact
  repeat_grayscale: bool = True
  position_embedding: str = "learned"
  qkv_bias: bool = True
  remat: bool = False

  def image_sides(self, num_spatial_dims: int = 2) -> tuple[int, ...]:
    """``image_size`` as one side per spatial axis."""
    if isinstance(self.image_size, int):
      return (self.image_size,) * num_spatial_dims
    sides = tuple(int(side) for side in self.image_size)
    if len(sides) != num_spatial_dims:
      raise ValueError(
        f"VisionTransformer image_size={sides} has {len(sides)} sides, but the input has "
        f"{num_spatial_dims} spatial axes"
      )
    return sides

  def patch_grid(self, num_spatial_dims: int = 2) -> tuple[int, ...]:
    """The patch grid of an ``image_size`` input, e.g. ``(14, 14)`` for ViT-B/16 at 224."""
    sides = self.image_sides(num_spatial_dims)
    if any(side % self.patch_size for side in sides):
      raise ValueError(
        f"VisionTransformer image_size={self.image_size} is not a multiple of "
        f"patch_size={self.patch_size}"
      )
    return tuple(side // self.patch_size for side in sides)

  def _check_images(self, images: jax.Array) -> jax.Array:
    """The input after the grayscale repeat, or a ValueError naming the shape and the fix."""
    channels_ok = images.shape[-1] in (1, 3) if self.repeat_grayscale else True
    if images.ndim < 4 or not channels_ok:
      raise ValueError(
        f"VisionTransformer expects images [B, H, W, 1 or 3] (or [B, D, H, W, C]), got "
        f"{images.shape}"
      )
    if self.repeat_grayscale and images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    spatial = images.shape[1:-1]
    patch = self.patch_size
    expected = self.patch_grid(len(spatial))
    if any(side % patch for side in spatial):
      raise ValueError(
        f"VisionTransformer: image sides {spatial} are not multiples of patch_size={patch}; "
        f"the model was built for {self.image_size}-pixel sides: pad or crop to a multiple of "
        f"{patch}"
      )
    grid = tuple(side // patch for side in spatial)
    if grid != expected:
      raise ValueError(
        f"VisionTransformer: images of sides {spatial} give a {grid} patch grid, but "
        f"pos_embedding holds a {expected} grid: the model was built for image_size="
        f"{self.image_size}; resize the images (or build the model for this size)"
      )
    return images

  def _position_table(self, tokens: int, grid: tuple[int, ...]) -> jax.Array | None:
    """``[1, tokens, D]`` added to the tokens (class token row included), or None."""
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(
        f"VisionTransformer position_embedding={self.position_embedding!r}; use one of "
        f"{POSITION_EMBEDDINGS}"
      )
    if self.position_embedding == "none":
      return None
    if self.position_embedding == "learned":
      return self.param(
        "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), partitioning.TOKEN_AXES),
        (1, tokens, self.hidden_dim),
      )
    table = sincos_position_embedding(grid, self.hidden_dim, self.position_embedding)
    if self.class_token:  # the class token gets a zero row, as in MAE
      table = np.concatenate([np.zeros((1, 1, self.hidden_dim), np.float32), table], axis=1)
    return jnp.asarray(table)

  @nn.compact
  def __call__(
    self, images: jax.Array, *, train: bool = False, return_tokens: bool = False
  ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, ...]]:
    """Args:
      images: ``[B, H, W, 1 or 3]`` (grayscale is repeated to 3 channels unless
        ``repeat_grayscale`` is False, which takes any ``C``), or a volume ``[B, D, H, W, C]``;
        the spatial sides must equal ``image_size``.
      train: dropout on (needs a ``'dropout'`` rng when a rate is non-zero).
      return_tokens: return the tokens instead of the features (no head).
    Returns:
      ``[B, hidden_dim]`` features (``num_classes == 0``) or ``[B, num_classes]`` logits; with
      ``return_tokens``, ``(tokens, hidden_states)``: the final-LayerNorm output
      ``[B, (1 +) N, D]`` and the ``depth`` block outputs ``[B, (1 +) N, D]`` before it.
    """
    images = self._check_images(images)
    spatial = images.shape[1:-1]
    patch = self.patch_size
    grid = tuple(side // patch for side in spatial)
    x = nn.Conv(
      self.hidden_dim,
      (patch,) * len(spatial),
      strides=(patch,) * len(spatial),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=partitioning.conv_kernel_init(_patch_init, len(spatial)),
      name="conv_proj",
    )(images)
    x = expose(self, _sown_name("conv_proj"), x)
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.hidden_dim)
    if self.class_token:
      token = self.param(
        "class_token",
        nn.with_logical_partitioning(nn.initializers.zeros, partitioning.TOKEN_AXES),
        (1, 1, self.hidden_dim),
      )
      token = jnp.broadcast_to(token.astype(x.dtype), (batch, 1, self.hidden_dim))
      x = jnp.concatenate([token, x], axis=1)
    position = self._position_table(x.shape[1], grid)
    if position is not None:
      x = x + position.astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x, hidden_states = encoder_stack(
      self,
      x,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      deterministic=not train,
      activation=self.activation,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      layer_norm_epsilon=self.layer_norm_epsilon,
      qkv_bias=self.qkv_bias,
      remat=self.remat,
      dtype=self.dtype,
    )
    if return_tokens:
      return x, tuple(hidden_states)
    features = x[:, 0] if self.class_token else jnp.mean(x, axis=1)
    if self.num_classes <= 0:
      return features
    return partitioning.dense(
      self.num_classes, "head", kernel_init=nn.initializers.zeros, dtype=self.dtype
    )(features)


def vit_b16(**overrides) -> VisionTransformer:
  """ViT-B/16 (224 px, patch 16, D 768, 12 blocks, 12 heads, MLP 3072); ``overrides`` replace
  any attribute (e.g. ``num_classes=2``, ``dtype=jnp.bfloat16``)."""
  sizes = dict(image_size=224, patch_size=16, hidden_dim=768, depth=12, num_heads=12, mlp_dim=3072)
  return VisionTransformer(**{**sizes, **overrides})
