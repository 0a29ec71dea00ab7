"""Image backbones by name, and the input scalings their references feed them.

``build_backbone(fields)`` makes a torchvision-layout :class:`~mammojax.nn.resnet.ResNet`
(``kind='resnet'``) or a :class:`~mammojax.nn.vit.VisionTransformer` (``kind='vit'``) without a
classifier: both return pooled features ``[B, D]`` (ResNet: global average pool; ViT: the class
token after the final LayerNorm), the features Temporal-GradCam takes.

:func:`prepare_images` turns the pipeline's ``[B, H, W, 1]`` images into what the backbone was
trained on (``input_scaling``):

* ``'standardize'``: as the pipeline gives them (zero mean, unit variance over the dataset);
  the embedded synthetic data and backbones trained from scratch use it.
* ``'unit'``: the stored intensities scaled to [0, 1] (the reference's ResNet input: the raw
  float slice, 256x256). The pipeline must then normalise with mean 0 and std 65535
  (:func:`pipeline_normalisation`).
* ``'unit_quantized'``: [0, 1] quantised to 256 levels, as the reference's ViT input
  (``np.int16(img * 255)`` -> PIL -> ``ToTensor``), then resized to ``input_size``.

``imagenet_normalize`` subtracts ImageNet's channel means and divides by its standard deviations
after the channel repeat (the normalisation ImageNet weights were trained with; the reference
applies none). ``input_size`` > 0 resizes bilinearly with antialiasing, as torchvision's
``Resize`` on tensors does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn.resnet import ResNet
from mammojax.nn.vit import VisionTransformer

BACKBONE_KINDS = ("resnet", "vit")
INPUT_SCALINGS = ("standardize", "unit", "unit_quantized")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The pipeline divides uint16 intensities by this for the [0, 1] scalings.
UINT16_MAX = 65535.0

_RESNET_FIELDS = ("depth", "base_width")
_VIT_FIELDS = ("patch_size", "hidden_dim", "depth", "num_heads", "mlp_dim", "image_size")


def build_backbone(
  fields: Mapping[str, Any],
  dtype: jnp.dtype = jnp.float32,
  name: str | None = None,
  activation: Callable[[jax.Array], jax.Array] | None = None,
) -> nn.Module:
  """The backbone ``fields['kind']`` names, without a classifier.

  Args:
    fields: ``kind`` (``'resnet'`` | ``'vit'``) and that kind's sizes (ResNet: ``depth``,
      ``base_width``; ViT: ``patch_size``, ``hidden_dim``, ``depth``, ``num_heads``,
      ``mlp_dim``, ``image_size``); other keys are ignored.
    dtype: computation dtype.
    name: the module name (inside a parent's compact method).
    activation: replaces the ResNet's every ReLU (guided backpropagation passes its rectified
      ReLU); None keeps the backbone's own. A ViT keeps its GELU.
  """
  kind = fields.get("kind")
  if kind == "resnet":
    own = {} if activation is None else {"activation": activation}
    return ResNet(
      **{k: fields[k] for k in _RESNET_FIELDS if k in fields}, dtype=dtype, name=name, **own
    )
  if kind == "vit":
    sizes = {k: fields[k] for k in _VIT_FIELDS if k in fields}
    return VisionTransformer(**sizes, dtype=dtype, name=name)
  raise ValueError(f"model.backbone.kind={kind!r} is not a backbone; use one of {BACKBONE_KINDS}")


def feature_dim(backbone: nn.Module) -> int:
  """Width ``D`` of the pooled features of a :func:`build_backbone` module."""
  if isinstance(backbone, ResNet):
    return backbone.base_width * 8 * (4 if backbone.depth >= 50 else 1)
  return backbone.hidden_dim


def encode(backbone: nn.Module, images: jax.Array, *, train: bool) -> jax.Array:
  """Pooled features ``[B, D]`` of prepared images ``[B, H, W, 3]``.

  ``train`` means the backbone itself trains: BatchNorm then uses and updates batch statistics
  (``batch_stats`` must be mutable) and dropout is on; a frozen backbone gets ``train=False``.
  """
  if isinstance(backbone, ResNet):
    return backbone(images, use_running_average=not train)
  return backbone(images, train=train)


def pipeline_normalisation(
  input_scaling: str, pixel_mean: float, pixel_std: float
) -> tuple[float, float]:
  """The ``(mean, std)`` the sequence pipeline normalises stored intensities with."""
  if input_scaling not in INPUT_SCALINGS:
    raise ValueError(f"model.backbone.input_scaling={input_scaling!r}; use one of {INPUT_SCALINGS}")
  if input_scaling == "standardize":
    return pixel_mean, pixel_std
  return 0.0, UINT16_MAX


def prepare_images(
  images: jax.Array,
  *,
  input_scaling: str = "standardize",
  imagenet_normalize: bool = False,
  input_size: int = 0,
) -> jax.Array:
  """``[B, H, W, 1]`` pipeline images -> ``[B, S, S, 3]`` backbone input (module docstring).

  Args:
    images: ``[B, H, W, 1]`` float, normalised by the pipeline as
      :func:`pipeline_normalisation` says for ``input_scaling``.
    input_scaling: one of :data:`INPUT_SCALINGS`.
    imagenet_normalize: apply ImageNet's channel mean and std.
    input_size: square size to resize to; 0 keeps ``H, W``.
  """
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(f"expected grayscale images [B, H, W, 1], got {images.shape}")
  if input_scaling not in INPUT_SCALINGS:
    raise ValueError(f"model.backbone.input_scaling={input_scaling!r}; use one of {INPUT_SCALINGS}")
  x = images.astype(jnp.float32)
  if input_scaling == "unit_quantized":
    # np.int16(img * 255) truncates towards zero; intensities are >= 0 here.
    x = jnp.floor(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0
  if input_size and (x.shape[1], x.shape[2]) != (input_size, input_size):
    x = jax.image.resize(x, (x.shape[0], input_size, input_size, 1), "linear", antialias=True)
  x = jnp.repeat(x, 3, axis=-1)
  if imagenet_normalize:
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return x
