"""Guided backpropagation (Springenberg et al. 2015) and guided GradCAM, as Captum defines them.

Guided backpropagation is the input gradient with every ReLU's backward pass rectified:
``grad_in = relu(grad_out) * 1[x > 0]`` (Captum: the ReLU's own gradient ``grad_out * 1[x > 0]``,
then a ReLU on it). :func:`guided_relu` is that ReLU as a ``jax.custom_vjp``; it is passed
through the model's activation attribute (:attr:`ModelAdapter.activation_field`), so the model
is not edited. Captum rewrites only ``torch.nn.ReLU`` modules; a model whose activation is not a
ReLU (torchvision's ViT and ours: GELU) gets the plain gradient, in Captum as here, and
:class:`Guided` says so (``rectified=False``).

Guided GradCAM is guided backpropagation times GradCAM with ``relu=True``, resized to the input
(``'nearest'`` by default, as Captum's ``GuidedGradCam``) and broadcast over the channels.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mammojax.interpret.adapter import ModelAdapter
from mammojax.interpret.gradcam import gradcam
from mammojax.interpret.gradients import input_gradient
from mammojax.interpret.interpolate import MODES


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
  """``max(x, 0)`` whose backward pass passes only positive gradients where ``x > 0``."""
  return jax.nn.relu(x)


def _guided_relu_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jax.nn.relu(x), x


def _guided_relu_backward(x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
  return (jnp.where(x > 0, jax.nn.relu(cotangent), jnp.zeros_like(cotangent)),)


guided_relu.defvjp(_guided_relu_forward, _guided_relu_backward)


class Guided(NamedTuple):
  """Attributions ``[B, H, W, C]``, and whether any ReLU was rectified (False: the model has no
  replaceable ReLU, the attributions are the plain input gradient, as in Captum)."""

  attributions: jax.Array
  rectified: bool


def _guided(adapter: ModelAdapter) -> tuple[ModelAdapter, bool]:
  if adapter.rectifiable:
    return adapter.with_activation(guided_relu), True
  return adapter, False


def guided_backprop(
  adapter: ModelAdapter, images: jax.Array, target: int | jax.Array | None
) -> Guided:
  """Captum's ``GuidedBackprop``.

  Args:
    adapter: the model; its ReLUs are rectified when :attr:`ModelAdapter.rectifiable`.
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int.
  Returns:
    :class:`Guided`: attributions ``[B, H, W, C]`` and ``rectified``.
  """
  guided, rectified = _guided(adapter)
  return Guided(input_gradient(guided, images, target), rectified)


@jax.jit
def _times_map(gradient: jax.Array, cam: jax.Array) -> jax.Array:
  return gradient * cam[..., None]


def guided_gradcam(
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  layer: str,
  *,
  upsample: str = "nearest",
) -> Guided:
  """Captum's ``GuidedGradCam``: guided backpropagation times the resized ``relu`` GradCAM.

  Args:
    adapter: the model.
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int.
    layer: the GradCAM layer, e.g. ``'layer4'``.
    upsample: ``'nearest'`` (Captum's default) or ``'bilinear'``.
  Returns:
    :class:`Guided`: attributions ``[B, H, W, C]`` and whether ReLUs were rectified.
  """
  if upsample not in MODES:  # None is not Captum's: GuidedGradCam always resizes
    raise ValueError(f"upsample must be one of {MODES}, got {upsample!r}")
  guided = guided_backprop(adapter, images, target)
  cam = gradcam(adapter, images, target, layer, relu=True, upsample=upsample)
  return Guided(_times_map(guided.attributions, cam), guided.rectified)
