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

LayerNorm epsilon is 1e-6 (torchvision and timm both). Checkpoint names, ours / torchvision /
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


class VisionTransformer(nn.Module):
  """ViT: ``[B, H, W, 1 or 3] -> [B, D]`` features or ``[B, num_classes]`` logits.

  Attributes:
    image_size: side of the (square, or cubic for volumes) image the model is built for; sizes
      ``pos_embedding`` (torchvision's ``image_size``; 224 for ViT-B/16).
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
  """

  image_size: int = 224
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

  def patch_grid(self, num_spatial_dims: int = 2) -> tuple[int, ...]:
    """The patch grid of an ``image_size`` input, e.g. ``(14, 14)`` for ViT-B/16 at 224."""
    if self.image_size % self.patch_size:
      raise ValueError(
        f"VisionTransformer image_size={self.image_size} is not a multiple of "
        f"patch_size={self.patch_size}"
      )
    return (self.image_size // self.patch_size,) * num_spatial_dims

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Args:
      images: ``[B, H, W, 1 or 3]`` (grayscale is repeated to 3 channels), or a volume
        ``[B, D, H, W, C]``; every spatial side must equal ``image_size``.
      train: dropout on (needs a ``'dropout'`` rng when a rate is non-zero).
    Returns:
      ``[B, hidden_dim]`` features (``num_classes == 0``) or ``[B, num_classes]`` logits.
    """
    if images.ndim < 4 or images.shape[-1] not in (1, 3):
      raise ValueError(
        f"VisionTransformer expects images [B, H, W, 1 or 3] (or [B, D, H, W, C]), got "
        f"{images.shape}"
      )
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    spatial = images.shape[1:-1]
    patch = self.patch_size
    expected = self.patch_grid(len(spatial))
    if any(side % patch for side in spatial):
      raise ValueError(
        f"VisionTransformer: image sides {spatial} are not multiples of patch_size={patch}; "
        f"the model was built for {self.image_size}-pixel sides"
      )
    grid = tuple(side // patch for side in spatial)
    if grid != expected:
      raise ValueError(
        f"VisionTransformer: images of sides {spatial} give a {grid} patch grid, but "
        f"pos_embedding holds a {expected} grid: the model was built for image_size="
        f"{self.image_size}; resize the images (or build the model for this size)"
      )
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
    token_init = lambda init: nn.with_logical_partitioning(init, partitioning.TOKEN_AXES)  # noqa: E731
    if self.class_token:
      token = self.param("class_token", token_init(nn.initializers.zeros), (1, 1, self.hidden_dim))
      token = jnp.broadcast_to(token.astype(x.dtype), (batch, 1, self.hidden_dim))
      x = jnp.concatenate([token, x], axis=1)
    position = self.param(
      "pos_embedding",
      token_init(nn.initializers.normal(stddev=0.02)),
      (1, x.shape[1], self.hidden_dim),
    )
    x = x + position.astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.depth):
      x = TransformerBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        pre_norm=True,
        activation=self.activation,
        attention_dropout_rate=self.attention_dropout_rate,
        dropout_rate=self.dropout_rate,
        layer_norm_epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        name=f"encoder_layer_{i}",
      )(x, deterministic=not train)
      x = expose(self, _sown_name(f"encoder_layer_{i}"), x)
    x = nn.LayerNorm(
      epsilon=self.layer_norm_epsilon,
      use_fast_variance=False,
      dtype=self.dtype,
      name="encoder_norm",
    )(x)
    x = expose(self, _sown_name("encoder_norm"), x)
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
