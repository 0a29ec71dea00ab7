"""The attribution methods by name, with one set of settings: what ``python -m mammojax.explain``
runs for every example.

:func:`attribution_maps` returns, per method, a host array at the input's resolution: GradCAM
``[B, H, W]`` (signed, Captum's default), the pixel methods ``[B, H, W, C]``. Defaults are
Captum's: integrated gradients 50 Gauss-Legendre steps from a zero baseline, gradient SHAP 5
samples drawn against a zero baseline without noise, nearest upsampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.interpret.adapter import ModelAdapter
from mammojax.interpret.gradcam import gradcam
from mammojax.interpret.guided import guided_backprop, guided_gradcam
from mammojax.interpret.integrated import gradient_shap, integrated_gradients
from mammojax.interpret.layers import layer_shapes

METHODS = ("gradcam", "guided_backprop", "guided_gradcam", "gradient_shap", "integrated_gradients")
# Gradient SHAP draws an interpolation point per image; the visits of one sequence must share
# theirs (see mammojax.interpret.temporal.VisitImages), so it is not run over visits.
SEQUENCE_METHODS = tuple(m for m in METHODS if m != "gradient_shap")
# The methods whose result depends on a layer.
LAYER_METHODS = ("gradcam", "guided_gradcam")


@dataclasses.dataclass(frozen=True)
class MethodSettings:
  """How the methods run.

  Attributes:
    layer: the GradCAM layer (a name of :func:`~mammojax.interpret.layers.layer_names`).
    n_steps: integrated gradients' quadrature points.
    n_samples: gradient SHAP's samples per example.
    stdevs: gradient SHAP's Gaussian input noise (0: none).
    internal_batch_size: at most this many rows per forward pass of the sampling methods.
    seed: gradient SHAP's draws.
    upsample: GradCAM's resize to the input, ``'nearest'`` or ``'bilinear'``.
  """

  layer: str
  n_steps: int = 50
  n_samples: int = 5
  stdevs: float = 0.0
  internal_batch_size: int | None = 32
  seed: int = 0
  upsample: str = "nearest"


def check_methods(methods: Sequence[str], allowed: Sequence[str] = METHODS) -> tuple[str, ...]:
  """``methods`` if every one is in ``allowed``, else a ValueError naming what is allowed."""
  unknown = [m for m in methods if m not in allowed]
  if unknown or not methods:
    raise ValueError(
      f"--methods: {', '.join(map(repr, unknown)) or 'none given'}; choose from {','.join(allowed)}"
    )
  return tuple(methods)


def _runners(settings: MethodSettings) -> dict[str, Callable]:
  def shap(adapter, images, target):
    return gradient_shap(
      adapter,
      images,
      target,
      jnp.zeros((1, *images.shape[1:]), images.dtype),
      key=jax.random.key(settings.seed),
      n_samples=settings.n_samples,
      stdevs=settings.stdevs,
      internal_batch_size=settings.internal_batch_size,
    )

  return {
    "gradcam": lambda adapter, images, target: gradcam(
      adapter, images, target, settings.layer, upsample=settings.upsample
    ),
    "guided_backprop": lambda adapter, images, target: (
      guided_backprop(adapter, images, target).attributions
    ),
    "guided_gradcam": lambda adapter, images, target: (
      guided_gradcam(
        adapter, images, target, settings.layer, upsample=settings.upsample
      ).attributions
    ),
    "gradient_shap": shap,
    "integrated_gradients": lambda adapter, images, target: (
      integrated_gradients(
        adapter,
        images,
        target,
        n_steps=settings.n_steps,
        internal_batch_size=settings.internal_batch_size,
      ).attributions
    ),
  }


def attribution_maps(
  adapter: ModelAdapter,
  images: jax.Array,
  target: jax.Array,
  methods: Sequence[str],
  settings: MethodSettings,
) -> dict[str, np.ndarray]:
  """Each method's maps of ``images`` ``[B, H, W, C]`` for ``target`` ``[B]``: GradCAM
  ``[B, H, W]``, the others ``[B, H, W, C]``, as float32 host arrays."""
  runners = _runners(settings)
  return {
    name: np.asarray(runners[name](adapter, images, target), np.float32)
    for name in check_methods(methods)
  }


def default_layer(adapter: ModelAdapter, images: jax.Array) -> str:
  """The last layer with a spatial map (a feature map ``[B, h, w, C]`` or a token sequence) whose
  gradient is not known to vanish: ``layer4`` of a ResNet, the last block but one of a ViT with a
  class token."""
  spatial = [
    name
    for name, shape in layer_shapes(adapter, images).items()
    if len(shape) in (3, 4)
    and name not in adapter.zero_gradient_layers
    and name.split("/")[-1] not in adapter.zero_gradient_layers
  ]
  if not spatial:
    raise ValueError(f"{type(adapter.module).__name__} exposes no spatial layer for GradCAM")
  return spatial[-1].split("/")[-1]
