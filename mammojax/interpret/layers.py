"""Layer capture: a layer's output and the gradient of a target logit with respect to it.

Why Flax's ``perturb``: a method is written once, against a pure function of the model, and
picks its layer by name. JAX has no hooks; ``nn.intercept_methods`` sees only submodule calls,
not values computed inline (ResNet's stem ReLU, its pooled features, a ViT's token stream);
splitting a model at a layer needs code per model and per layer. Instead the backbones pass every
value they sow through ``self.perturb(name, x)`` (skipped at ``init``, a no-op unless the caller
passes a ``'perturbations'`` collection, so inference, training and checkpoints never see it).
Here

1. ``jax.eval_shape`` of a call with ``'perturbations'`` mutable lists every exposed layer and
   its shape, with no computation;
2. the target is differentiated with respect to a zero perturbation of the chosen layer (the
   other layers' zeros are constants), so that ``d target / d perturbation`` is
   ``d target / d layer output``; the layer's output itself comes back through the sown
   ``'intermediates'`` of the same forward pass.

One forward and one backward pass, jit-compatible, for any module that exposes its layers this
way, nested ones included (a backbone named ``backbone`` gives ``backbone/layer3``; the bare
``layer3``, or any trailing part of a path such as ``blocks_3/output``, is accepted when it is
unambiguous).

Layout: maps are channels-last, ``[B, *S, C]``. A token layer ``[B, T, D]`` of a model with a
patch size (ViT) becomes its patch grid ``[B, h, w, D]`` (class token dropped). A layer sown more
than once per call (a module reused) is refused: its perturbation would add to every use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from mammojax.interpret.adapter import ModelAdapter, target_logits
from mammojax.nn.vit import tokens_to_grid


def _exposed(adapter: ModelAdapter, images: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
  """(``{path: ShapeDtypeStruct}`` of the perturbable layers, of the sown intermediates), in the
  order the model computes them (``eval_shape``'s own output would sort the names)."""
  found = {}

  def trace(x: jax.Array) -> None:
    _, state = adapter.apply(x, mutable=("intermediates", "perturbations"))
    found["perturbations"] = {
      path: jax.ShapeDtypeStruct(value.shape, value.dtype)
      for path, value in _flat(state.get("perturbations", {})).items()
    }
    found["intermediates"] = {
      path: len(value) for path, value in _flat(state.get("intermediates", {})).items()
    }

  jax.eval_shape(trace, jax.ShapeDtypeStruct(images.shape, images.dtype))
  return found["perturbations"], found["intermediates"]


def _flat(tree: Any) -> dict[str, Any]:
  """``{'/'-joined path: leaf}``; a sown tuple is one leaf."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def layer_names(adapter: ModelAdapter, images: jax.Array) -> tuple[str, ...]:
  """The layers of ``adapter``'s model on images shaped like ``images`` ``[B, H, W, C]``, in
  call order (``'/'``-joined paths for nested modules)."""
  perturbable, _ = _exposed(adapter, images)
  return tuple(perturbable)


def layer_shapes(adapter: ModelAdapter, images: jax.Array) -> dict[str, tuple[int, ...]]:
  """``{layer: output shape}`` of :func:`layer_names`, in call order."""
  perturbable, _ = _exposed(adapter, images)
  return {name: tuple(value.shape) for name, value in perturbable.items()}


def resolve_layer(adapter: ModelAdapter, images: jax.Array, layer: str) -> str:
  """The full path of ``layer``, or a ValueError that lists the available layers."""
  return _resolve(adapter, *_exposed(adapter, images), layer)


def _resolve(
  adapter: ModelAdapter, perturbable: dict[str, Any], sown: dict[str, Any], layer: str
) -> str:
  if layer in perturbable:
    return layer
  # The trailing path components suffice when they are unambiguous: 'layer3', 'fpn/stride_16'.
  matches = [path for path in perturbable if path.endswith(f"/{layer}")]
  if len(matches) == 1:
    return matches[0]
  model = type(adapter.module).__name__
  if len(matches) > 1:
    raise ValueError(f"layer {layer!r} of {model} is ambiguous: {', '.join(matches)}")
  hint = ""
  if layer in sown:
    hint = " (it is sown but not passed through perturb, so its gradient cannot be taken)"
  raise ValueError(
    f"unknown layer {layer!r} of {model}{hint}; available layers: "
    f"{', '.join(perturbable) or 'none (the model exposes no layer through perturb)'}"
  )


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(flat, sep="/")


def _as_map(adapter: ModelAdapter, value: jax.Array, images: jax.Array) -> jax.Array:
  """A token layer ``[B, T, D]`` as its patch grid ``[B, *grid, D]``; other layers unchanged."""
  if adapter.patch_size is None or value.ndim != 3:
    return value
  return tokens_to_grid(value, token_grid(adapter, value, images), class_token=adapter.class_token)


def token_grid(adapter: ModelAdapter, tokens: jax.Array, images: jax.Array) -> tuple[int, ...]:
  """The patch grid of ``tokens`` ``[B, T, D]``: the images' sides over the patch size, or,
  when the model resizes its input first (e.g. to 224 x 224), the grid of the token count with
  the images' aspect ratio."""
  count = tokens.shape[1] - int(adapter.class_token)
  grid = tuple(side // adapter.patch_size for side in images.shape[1:-1])
  if math.prod(grid) == count:
    return grid
  height, width = images.shape[1:3]
  rows = round(math.sqrt(count * height / width))
  if len(grid) != 2 or rows < 1 or count % rows:
    raise ValueError(
      f"cannot lay {count} tokens out as a patch grid of images {images.shape[1:-1]} "
      f"(patch {adapter.patch_size})"
    )
  return rows, count // rows


def layer_activation_and_gradient(
  adapter: ModelAdapter, images: jax.Array, target: jax.Array | None, layer: str
) -> tuple[jax.Array, jax.Array]:
  """A layer's output ``A`` and ``G = d(target logit) / dA`` for every example, traceable.

  Args:
    adapter: the model.
    images: ``[B, H, W, C]``.
    target: ``[B]`` class indices (None for a model with one output).
    layer: a name from :func:`layer_names`.
  Returns:
    ``(A, G)``, each ``[B, *S, C]`` (token layers as patch grids, see the module docstring), or
    ``[B, C]`` for a layer without spatial axes.
  """
  ((activation, gradient),) = layers_activation_and_gradient(adapter, images, target, (layer,))
  return activation, gradient


def layers_activation_and_gradient(
  adapter: ModelAdapter, images: jax.Array, target: jax.Array | None, layers: Sequence[str]
) -> list[tuple[jax.Array, jax.Array]]:
  """:func:`layer_activation_and_gradient` of several layers from one forward and one backward
  pass (e.g. one layer in each of two calls of a shared encoder), in the order of ``layers``."""
  shapes, sown = _exposed(adapter, images)
  paths = [_resolve(adapter, shapes, sown, layer) for layer in layers]
  for path in paths:
    if sown.get(path, 1) != 1:
      raise ValueError(f"layer {path!r} is computed {sown[path]} times per call; need once")
  zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}

  def target_sum(deltas: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    perturbations = _unflatten({**zeros, **dict(zip(paths, deltas))})
    logits, state = adapter.apply(images, perturbations=perturbations, mutable=("intermediates",))
    sown_values = _flat(state["intermediates"])
    return jnp.sum(target_logits(logits, target)), tuple(sown_values[p][0] for p in paths)

  gradients, activations = jax.grad(target_sum, has_aux=True)(tuple(zeros[p] for p in paths))
  return [
    (_as_map(adapter, activation, images), _as_map(adapter, gradient, images))
    for activation, gradient in zip(activations, gradients)
  ]
