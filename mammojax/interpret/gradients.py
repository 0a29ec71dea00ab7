"""Input gradients: the plain gradient, saliency and input x gradient (Captum's ``Saliency``,
``InputXGradient``), every example's own gradient at once, one compiled program for all three."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mammojax.interpret.adapter import ModelAdapter, as_float, summed_target, targets


@jax.jit
def _input_gradient(adapter: ModelAdapter, images: jax.Array, target: jax.Array | None):
  return jax.grad(summed_target(adapter, target))(images)


def input_gradient(
  adapter: ModelAdapter, images: jax.Array, target: int | jax.Array | None
) -> jax.Array:
  """``d logit[target] / d images`` of every example.

  Args:
    adapter: the model.
    images: ``[B, H, W, C]``.
    target: the class of each example, ``[B]`` ints or one int (None: single-output model).
  Returns:
    ``[B, H, W, C]``.
  """
  images = as_float(images)
  return _input_gradient(adapter, images, targets(target, images.shape[0]))


def saliency(
  adapter: ModelAdapter,
  images: jax.Array,
  target: int | jax.Array | None,
  *,
  absolute: bool = True,
) -> jax.Array:
  """Captum's ``Saliency``: ``|d logit[target] / d images|`` (the signed gradient when
  ``absolute`` is False), ``[B, H, W, C]``."""
  gradient = input_gradient(adapter, images, target)
  return jnp.abs(gradient) if absolute else gradient


def input_x_gradient(
  adapter: ModelAdapter, images: jax.Array, target: int | jax.Array | None
) -> jax.Array:
  """Captum's ``InputXGradient``: ``images * d logit[target] / d images``, ``[B, H, W, C]``."""
  return as_float(images) * input_gradient(adapter, images, target)
