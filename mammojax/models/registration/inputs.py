"""What an image pair and the instance-optimisation settings must satisfy before registration.

``python -m mammojax.register`` and :func:`mammojax.register.register` refuse, before any
optimisation, what would otherwise end in an all-NaN field or a crash after the work.
"""

from __future__ import annotations

import math

import numpy as np


class RegistrationInputError(ValueError):
  """Inputs that cannot be registered together; the message says why and what to do."""


def check_image(image: np.ndarray, name: str) -> None:
  """Refuses an image that cannot be registered: fewer than 2 pixels along an axis, NaN or
  infinite values, or a single intensity (nothing to align; min-max scaling is undefined).

  Raises:
    RegistrationInputError: naming ``name`` (e.g. ``'--fixed a.png'``) and the reason.
  """
  if image.size == 0 or min(image.shape) < 2:
    raise RegistrationInputError(
      f"{name} has shape {tuple(image.shape)}: registration needs at least 2 pixels along every "
      "axis"
    )
  finite = np.isfinite(image)
  if not finite.all():
    raise RegistrationInputError(
      f"{name} has {int(image.size - finite.sum())} NaN or infinite values: give an image with "
      "finite intensities"
    )
  low, high = float(image.min()), float(image.max())
  if not high > low:
    raise RegistrationInputError(
      f"{name} is constant (every value is {low:g}): there is nothing to register; check that "
      "it is the intended image"
    )


def check_options(
  *,
  steps: int,
  lmbda: float,
  learning_rate: float,
  sigma: float,
  levels: int = 1,
  squaring_steps: int = 0,
) -> None:
  """Refuses optimisation settings that would give NaN or no optimisation at all.

  Raises:
    RegistrationInputError: naming the flag, its value and the accepted range.
  """
  if steps < 0:
    raise RegistrationInputError(f"--steps={steps}: give a number of steps >= 0")
  if levels < 1:
    raise RegistrationInputError(f"--levels={levels}: give 1 (full size only) or more levels")
  if not 0 <= squaring_steps <= 20:
    raise RegistrationInputError(
      f"--squaring_steps={squaring_steps}: give 0 to 20 scaling-and-squaring steps (7 is usual)"
    )
  checks = (
    ("lambda", lmbda, lmbda >= 0, "the regulariser weight must be a finite number >= 0"),
    ("lr", learning_rate, learning_rate > 0, "the Adam step size must be a finite number > 0"),
    ("sigma", sigma, sigma > 0, "the LNCC window width must be a finite number > 0 (pixels)"),
  )
  for flag, value, in_range, rule in checks:
    if not (math.isfinite(value) and in_range):
      raise RegistrationInputError(f"--{flag}={value}: {rule}")
