"""Registration of one image pair by instance optimisation (the engine of ``mammojax.register``).

A transformation is optimised with Adam to minimise
``similarity(moving(phi(x)), fixed(x)) + lambda * regularity(parameter)``, coarse to fine:

* ``transform='velocity'`` (the default) optimises a stationary velocity field ``v`` and warps
  with its group exponential ``phi = exp(v)`` by scaling and squaring (``v / 2**K`` composed
  with itself ``K`` times). The exponential of a smooth field is a diffeomorphism, so a smooth
  deformation comes back without folds; the regulariser acts on ``v``.
* ``transform='displacement'`` optimises ``u`` in ``phi(x) = x + u(x)`` directly (faster per
  step, but nothing keeps its Jacobian positive: fine structures can fold).

Multi-resolution (``levels``): the images are smoothed and resampled to ``1/2**(levels - 1)``
of their size, optimised there for ``steps`` steps, and the parameter is upsampled (values
rescaled to the new pixels) to start the next level, up to full size. Coarse levels capture
the large, smooth part of the motion cheaply and keep the fine level from settling into a local
minimum that folds. Levels that would be under 8 pixels along an axis are skipped.

A starting field (``initial_displacement``, e.g. a trained network's) is kept fixed and the
optimised transformation refines it: ``phi = phi_initial ∘ exp(v)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mammojax.losses import registration as regularity_losses
from mammojax.losses import similarity as similarity_losses
from mammojax.models.registration.inputs import check_image, check_options
from mammojax.nn import warp as warp_lib

SIMILARITIES = ("lncc", "ncc", "ssd", "mind", "mi")
REGULARIZERS = ("diffusion", "bending")
# This engine is no port of icon_registration: its regulariser is plain pixel finite differences
# of the optimised field at each level (``mammojax.losses.registration``'s 'pixel' convention),
# so ``--lambda`` does not pick up ICON's size- and aspect-dependent factors.
REGULARITY_CONVENTION = "pixel"
TRANSFORMS = ("velocity", "displacement")
# Smallest side a coarse level may have: below it LNCC windows and the regulariser's finite
# differences see almost nothing of the image.
MIN_LEVEL_SIDE = 8


def similarity_fn(name: str, sigma: float) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The loss ``(warped [B, *S, 1], fixed [B, *S, 1]) -> scalar`` named ``name``."""
  if name == "lncc":
    return lambda a, b: similarity_losses.lncc_loss(a, b, sigma=sigma)
  table = {
    "ncc": similarity_losses.ncc_loss,
    "ssd": similarity_losses.ssd_loss,
    "mind": similarity_losses.mind_loss,
    "mi": similarity_losses.mutual_information_loss,
  }
  if name not in table:
    raise ValueError(f"--similarity must be one of {SIMILARITIES}, got {name!r}")
  return table[name]


def exponential(velocity: jax.Array, squaring_steps: int) -> jax.Array:
  """Displacement of ``exp(v)`` by scaling and squaring.

  Args:
    velocity: ``[B, *S, n]`` pixels, 'ij'.
    squaring_steps: ``K``: ``v / 2**K`` is composed with itself ``K`` times.
  Returns:
    ``[B, *S, n]`` pixels.
  """
  # A loop, not an unrolled chain: one composition to compile instead of K (forward and back).
  return jax.lax.fori_loop(
    0,
    squaring_steps,
    lambda _, u: warp_lib.compose_displacements(u, u),
    velocity / (2.0**squaring_steps),
  )


def level_shapes(shape: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
  """Spatial shapes from coarsest to full size, halving per level, none under
  ``MIN_LEVEL_SIDE`` pixels (the full size is always last)."""
  shapes = []
  for level in reversed(range(levels)):
    factor = 2**level
    coarse = tuple(max(1, math.ceil(side / factor)) for side in shape)
    if level == 0 or min(coarse) >= MIN_LEVEL_SIDE:
      shapes.append(coarse)
  return shapes


def _resample_image(image: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``[B, *S, 1]`` to ``[B, *shape, 1]``, antialiased when shrinking."""
  if tuple(image.shape[1:-1]) == shape:
    return image
  return jax.image.resize(image, (image.shape[0], *shape, 1), "linear", antialias=True)


def _resample_field(field: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if tuple(field.shape[1:-1]) == shape:
    return field
  return warp_lib.resize_displacement(field, shape)


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Everything static about the objective: one compiled step per settings and level shape,
  reused by later pairs of the same shape."""

  similarity: str
  sigma: float
  lmbda: float
  regularizer: str
  transform: str
  squaring_steps: int
  learning_rate: float

  def optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.learning_rate)

  def displacement(self, parameter: jax.Array, start: jax.Array | None) -> jax.Array:
    """The field ``[B, *S, n]`` of the optimised ``parameter`` after ``start`` (if any)."""
    own = exponential(parameter, self.squaring_steps) if self.transform == "velocity" else parameter
    return own if start is None else warp_lib.compose_displacements(start, own)

  def objective(self, parameter, moving, fixed, start) -> jax.Array:
    warped = warp_lib.warp(moving, self.displacement(parameter, start), padding="border")
    regularity = (
      regularity_losses.diffusion_regularity
      if self.regularizer == "diffusion"
      else regularity_losses.bending_energy
    )
    similarity = similarity_fn(self.similarity, self.sigma)
    return similarity(warped, fixed) + self.lmbda * regularity(
      parameter, convention=REGULARITY_CONVENTION
    )


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _step(settings: _Settings, parameter, opt_state, moving, fixed, start):
  value, grad = jax.value_and_grad(settings.objective)(parameter, moving, fixed, start)
  updates, opt_state = settings.optimizer().update(grad, opt_state, parameter)
  return optax.apply_updates(parameter, updates), opt_state, value


@functools.partial(jax.jit, static_argnums=0)
def _result(settings: _Settings, parameter, moving, fixed, start):
  """``(displacement, warped, similarity_before, similarity_after, determinant)`` at full size."""
  displacement = settings.displacement(parameter, start)
  warped = warp_lib.warp(moving, displacement, padding="border")
  similarity = similarity_fn(settings.similarity, settings.sigma)
  determinant = warp_lib.jacobian_determinant(displacement)
  return displacement, warped, similarity(moving, fixed), similarity(warped, fixed), determinant


def register(
  fixed: np.ndarray,
  moving: np.ndarray,
  *,
  steps: int = 200,
  similarity: str = "lncc",
  lmbda: float = 1.0,
  regularizer: str = "diffusion",
  learning_rate: float = 0.1,
  sigma: float = 2.0,
  transform: str = "velocity",
  levels: int = 3,
  squaring_steps: int = 7,
  initial_displacement: np.ndarray | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Optimises a transformation registering ``moving`` to ``fixed`` (module docstring).

  Args:
    fixed, moving: ``[H, W]`` or ``[D, H, W]`` float32, same shape.
    steps: Adam iterations per level.
    similarity: one of ``SIMILARITIES`` (``'mi'`` is mutual information).
    lmbda: weight of the regulariser.
    regularizer: ``'diffusion'`` or ``'bending'``, on the optimised field, in pixel units
      (``REGULARITY_CONVENTION``).
    learning_rate: Adam step size in pixels (of each level).
    sigma: LNCC window std in pixels (of each level, so wider in full-size pixels when coarse).
    transform: ``'velocity'`` (diffeomorphic) or ``'displacement'``.
    levels: resolution levels (1: full size only).
    squaring_steps: scaling-and-squaring steps of ``'velocity'``.
    initial_displacement: ``[*S, n]`` pixels, 'ij' (e.g. a network's prediction), refined.
  Returns:
    ``{'displacement': [*S, n] pixels with warped(x) = moving(x + u(x)), 'warped': [*S],
    'similarity_before', 'similarity_after', 'folds', 'min_jacobian'}``.

  Raises:
    RegistrationInputError: an image or setting refused by ``check_image`` or
      ``check_options``, before any optimisation.
  """
  if regularizer not in REGULARIZERS:
    raise ValueError(f"--regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
  if transform not in TRANSFORMS:
    raise ValueError(f"--transform must be one of {TRANSFORMS}, got {transform!r}")
  check_options(
    steps=steps,
    lmbda=lmbda,
    learning_rate=learning_rate,
    sigma=sigma,
    levels=levels,
    squaring_steps=squaring_steps,
  )
  check_image(fixed, "fixed")
  check_image(moving, "moving")
  num_axes = fixed.ndim
  fixed_b = jnp.asarray(fixed, jnp.float32)[None, ..., None]
  moving_b = jnp.asarray(moving, jnp.float32)[None, ..., None]
  initial = None
  if initial_displacement is not None:
    expected = (*fixed.shape, num_axes)
    if tuple(initial_displacement.shape) != expected:
      raise ValueError(
        f"initial displacement has shape {initial_displacement.shape}, expected {expected}"
      )
    initial = jnp.asarray(initial_displacement, jnp.float32)[None]
  similarity_fn(similarity, sigma)  # an unknown name fails here, before any compilation
  settings = _Settings(
    similarity,
    float(sigma),
    float(lmbda),
    regularizer,
    transform,
    squaring_steps,
    float(learning_rate),
  )
  shapes = level_shapes(tuple(fixed.shape), levels)
  parameter = jnp.zeros((1, *shapes[0], num_axes), jnp.float32)
  bar = _progress_bar(steps * len(shapes), progress)
  for shape in shapes:
    parameter = _optimise_level(
      settings,
      _resample_field(parameter, shape),
      (
        _resample_image(moving_b, shape),
        _resample_image(fixed_b, shape),
        None if initial is None else _resample_field(initial, shape),
      ),
      steps,
      bar,
    )
  bar.close()
  displacement, warped, before, after, determinant = _result(
    settings, parameter, moving_b, fixed_b, initial
  )
  return {
    "displacement": np.asarray(displacement[0]),
    "warped": np.asarray(warped[0, ..., 0]),
    "similarity_before": float(before),
    "similarity_after": float(after),
    "folds": int(jnp.sum(determinant < 0)),
    "min_jacobian": float(jnp.min(determinant)),
  }


def _optimise_level(
  settings: _Settings,
  parameter: jax.Array,
  images: tuple[jax.Array, jax.Array, jax.Array | None],
  steps: int,
  bar: Any,
) -> jax.Array:
  """``steps`` Adam steps from ``parameter`` on ``images = (moving, fixed, start)`` of one
  level (fresh Adam moments per level: the step sizes are in that level's pixels)."""
  opt_state = settings.optimizer().init(parameter)
  for i in range(steps):
    parameter, opt_state, value = _step(settings, parameter, opt_state, *images)
    bar.update(1)
    if not bar.disable and (i % 10 == 0 or i == steps - 1):
      bar.set_postfix(
        size="x".join(map(str, parameter.shape[1:-1])), objective=f"{float(value):.4f}"
      )
  return parameter


def _progress_bar(total: int, progress: bool) -> Any:
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  return tqdm(
    total=total,
    disable=not progress,
    unit="step",
    desc="register",
    file=sys.stderr,
    dynamic_ncols=True,
  )
