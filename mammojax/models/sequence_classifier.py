"""Temporal-GradCam's classifiers as Flax modules: one image, or a patient's image sequence.

* :class:`ImageClassifier`: backbone -> pooled features ``[B, D]`` -> ``Dense(num_classes)``
  named ``head`` (the reference replaces torchvision's ``fc`` / ``heads.head`` by a new 2-way
  linear layer; so do we).
* :class:`SequenceClassifier`: the backbone applied to every image of ``[B, L, H, W, 1]``
  (features computed inside the step, so gradients reach the pixels of every image), padded
  positions zeroed, then a temporal model from :mod:`mammojax.models.temporal` over
  ``[B, L, D]``. The frozen-feature route runs the same temporal model on features extracted
  once (:mod:`mammojax.tasks.temporal_features`), so both routes give the same logits for the
  same weights.

Variables: ``backbone/...`` (the :func:`~mammojax.models.backbones.build_backbone` tree, whose
names match an imported torchvision / timm backbone), ``head`` or ``temporal/...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.models import backbones
from mammojax.models.temporal import build_temporal_model


class ImageClassifier(nn.Module):
  """``[B, H, W, 1]`` images -> ``[B, num_classes]`` logits.

  Attributes:
    backbone: ``model.backbone`` fields (kind, sizes, input_scaling, imagenet_normalize,
      input_size).
    num_classes: classes of the linear head.
    backbone_trainable: False = a frozen backbone (BatchNorm keeps its running statistics and
      no dropout, even while the head trains).
    dtype: computation dtype.
    backbone_activation: replaces a ResNet backbone's ReLUs (guided backpropagation); None
      keeps them.
  """

  backbone: Mapping[str, Any]
  num_classes: int = 2
  backbone_trainable: bool = False
  dtype: jnp.dtype = jnp.float32
  backbone_activation: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    features = image_features(
      self.backbone,
      images,
      train=train and self.backbone_trainable,
      dtype=self.dtype,
      activation=self.backbone_activation,
    )
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features).astype(jnp.float32)


class SequenceClassifier(nn.Module):
  """``[B, L, H, W, 1]`` image sequences -> ``[B, num_classes]`` logits.

  Attributes:
    backbone: ``model.backbone`` fields, as :class:`ImageClassifier`.
    temporal: ``model.temporal`` fields (``kind`` and that model's sizes).
    num_classes: output classes.
    backbone_trainable: whether the backbone trains with the temporal model.
    dtype: computation dtype.
    backbone_activation: as :class:`ImageClassifier`'s.
  """

  backbone: Mapping[str, Any]
  temporal: Mapping[str, Any]
  num_classes: int = 2
  backbone_trainable: bool = False
  dtype: jnp.dtype = jnp.float32
  backbone_activation: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(
    self,
    images: jax.Array,
    mask: jax.Array,
    time_offsets: jax.Array,
    *,
    train: bool = False,
  ) -> jax.Array:
    """Args:
    images: ``[B, L, H, W, 1]`` (zeros at padding).
    mask: ``[B, L]``, 1 = a real image.
    time_offsets: ``[B, L]`` years before the current image.
    """
    if images.ndim != 5:
      raise ValueError(f"SequenceClassifier expects images [B, L, H, W, 1], got {images.shape}")
    b, length = images.shape[:2]
    flat = images.reshape((b * length,) + images.shape[2:])
    features = image_features(
      self.backbone,
      flat,
      train=train and self.backbone_trainable,
      dtype=self.dtype,
      activation=self.backbone_activation,
    )
    features = features.reshape(b, length, -1) * mask[..., None].astype(features.dtype)
    temporal = temporal_module(self.temporal, self.num_classes, name="temporal")
    return temporal(features, mask, time_offsets, train=train)


class ImageEncoder(nn.Module):
  """The backbone of the classifiers alone: ``[B, H, W, 1]`` pipeline images -> pooled features
  ``[B, D]`` (evaluation mode), with the classifiers' variable names (``backbone/...``) so a
  trained classifier's backbone loads unchanged.

  Attributes:
    backbone: ``model.backbone`` fields, as :class:`ImageClassifier`.
  """

  backbone: Mapping[str, Any]

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    return image_features(self.backbone, images, train=False)


def temporal_module(
  fields: Mapping[str, Any], num_classes: int, name: str | None = None
) -> nn.Module:
  """The temporal model ``fields['kind']`` names with the rest of ``fields`` as its sizes."""
  sizes = {k: v for k, v in fields.items() if k != "kind"}
  return build_temporal_model(fields["kind"], num_classes, **sizes, name=name)


def image_features(
  fields: Mapping[str, Any],
  images: jax.Array,
  *,
  train: bool,
  dtype: jnp.dtype = jnp.float32,
  activation: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """Pooled backbone features ``[B, D]`` of pipeline images ``[B, H, W, 1]``; call inside a
  compact method (the backbone is created there as ``backbone``, with ``activation`` as
  :func:`~mammojax.models.backbones.build_backbone` takes it)."""
  prepared = backbones.prepare_images(
    images,
    input_scaling=fields.get("input_scaling", "standardize"),
    imagenet_normalize=fields.get("imagenet_normalize", False),
    input_size=fields.get("input_size", 0),
  )
  net = backbones.build_backbone(fields, dtype=dtype, name="backbone", activation=activation)
  return backbones.encode(net, prepared.astype(dtype), train=train).astype(jnp.float32)
