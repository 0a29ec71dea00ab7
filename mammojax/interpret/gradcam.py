"""GradCAM (Selvaraju et al. 2017) as Captum's ``LayerGradCam`` defines it, channels-last.

With ``A`` a layer's output ``[B, *S, C]`` and ``G = d logit[target] / dA``:

* channel weights ``w = mean of G over the spatial axes S`` (``w = G`` for a layer without
  spatial axes, ``[B, C]``);
* map ``= sum over channels of w * A``, ``[B, *S]`` (``attr_dim_summation=False``: ``w * A``
  per channel, ``[B, *S, C]``);
* signed unless ``relu`` (Captum's ``relu_attributions`` defaults to False, unlike the paper's
  ReLU);
* then resized to the input's spatial size with :func:`mammojax.interpret.interpolate.interpolate`
  (``'nearest'``, Captum's default, or ``'bilinear'``), or left at the layer's resolution.

ViT token layers are patch grids (class token dropped, see :mod:`mammojax.interpret.layers`).
The last block's output (and ``encoder_norm_out``) gives zero maps with a class token: only the
class token of that output reaches the head, so take an earlier block (a warning says so).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from mammojax.interpret.adapter import ModelAdapter, as_float, targets
from mammojax.interpret.interpolate import MODES, interpolate
from mammojax.interpret.layers import layer_activation_and_gradient


def warn_zero_gradient(adapter: ModelAdapter, layer: str) -> None:
  if layer in adapter.zero_gradient_layers or layer.split("/")[-1] in adapter.zero_gradient_layers:
    warnings.warn(
      f"layer {layer!r} of {type(adapter.module).__name__}: its patch tokens never reach the "
      "class token, so the gradient and the map are zero; take an earlier block",
      stacklevel=3,
    )


@functools.partial(jax.jit, static_argnames="layer")
def _channel_maps(
  adapter: ModelAdapter, images: jax.Array, target: jax.Array | None, layer: str
) -> jax.Array:
  """``w * A`` per channel, ``[B, *S, C]`` (``G * A``, ``[B, C]``, without spatial axes): the
  network's part of GradCAM, compiled once per layer whatever the options."""
  activation, gradient = layer_activation_and_gradient(adapter, images, target, layer)
  spatial = tuple(range(1, activation.ndim - 1))
  weights = jnp.mean(gradient, axis=spatial, keepdims=True) if spatial else gradient
  return weights * activation


def _finish(
  maps: jax.Array,
  size: tuple[int, ...],
  relu: bool,
  upsample: str | None,
  attr_dim_summation: bool,
) -> jax.Array:
  """Channel sum, ReLU and resizing of :func:`_channel_maps`' ``[B, *S, C]`` (a few cheap ops,
  not compiled as one program: their compilations are shared by every variant)."""
  if attr_dim_summation:
    maps = jnp.sum(maps, axis=-1)
  if relu:
    maps = jax.nn.relu(maps)
  if upsample is not None:
    maps = interpolate(maps, size, upsample, axes=tuple(range(1, 1 + len(size))))
  return maps


def gradcam(
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  layer: str,
  *,
  relu: bool = False,
  upsample: str | None = "nearest",
  attr_dim_summation: bool = True,
) -> jax.Array:
  """Captum's ``LayerGradCam`` on ``layer``, resized to the input (see the module docstring).

  Args:
    adapter: the model (:mod:`mammojax.interpret.adapter`).
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int.
    layer: a layer name (:func:`mammojax.interpret.layers.layer_names`), e.g. ``'layer4'``.
    relu: keep the positive part of the map (the paper's GradCAM; Captum's default is signed).
    upsample: ``'nearest'`` or ``'bilinear'`` to the input's ``[H, W]``, or None for the
      layer's resolution ``[h, w]``.
    attr_dim_summation: sum the weighted channels (False: one map per channel).
  Returns:
    ``[B, H, W]`` (``[B, h, w]`` without ``upsample``; ``[..., C]`` without summation; ``[B]``
    for a layer without spatial axes).
  """
  if upsample is not None and upsample not in MODES:
    raise ValueError(f"upsample must be one of {MODES} or None, got {upsample!r}")
  warn_zero_gradient(adapter, layer)
  images = as_float(images)
  target = targets(target, images.shape[0])
  size = tuple(images.shape[1:-1])
  if upsample is not None:  # checked on the traced shape, before anything compiles
    shape = jax.eval_shape(functools.partial(_channel_maps, layer=layer), adapter, images, target)
    if len(shape.shape) != 2 + len(size):
      raise ValueError(
        f"layer {layer!r} has no {len(size)} spatial axes (maps {shape.shape}): use upsample=None"
      )
  maps = _channel_maps(adapter, images, target, layer=layer)
  return _finish(maps, size, relu, upsample, attr_dim_summation)
