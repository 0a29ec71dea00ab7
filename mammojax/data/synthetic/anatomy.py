"""The synthetic breast both generators draw: shape, fibroglandular texture, masses, noise.

A breast is a half ellipse against the chest wall (left edge, column 0) with a skin falloff and
fibroglandular texture (band-passed noise, streaks towards the nipple) whose amount follows the
BI-RADS density (1-4). Intensities are in [0, ~1] until :func:`to_uint16` stores them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def breast_anatomy(rng: np.random.Generator, height: int, width: int, density: int) -> np.ndarray:
  """Breast intensity in [0, ~1], zero outside the breast; chest wall at column 0."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  center_row = height * rng.uniform(0.45, 0.55)
  semi_rows = height * rng.uniform(0.38, 0.47)
  semi_cols = width * rng.uniform(0.65, 0.9)
  radial = np.sqrt(((rows - center_row) / semi_rows) ** 2 + (cols / semi_cols) ** 2)
  inside = radial < 1.0
  fat = 0.35 + 0.1 * rng.random()
  skin_falloff = np.clip((1.0 - radial) * 8.0, 0.0, 1.0)
  # Fibroglandular texture: band-passed noise plus streaks pointing at the nipple.
  noise = rng.standard_normal((height, width))
  texture = ndimage.gaussian_filter(noise, 1.5) - ndimage.gaussian_filter(noise, 6.0)
  streaks = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=(3.0, 0.7))
  tissue = np.clip(
    0.6 * texture / (texture.std() + 1e-8)
    + 0.4 * streaks / (streaks.std() + 1e-8)
    + (density - 2.5) * 0.6,
    -2.0,
    3.0,
  )
  glandular = (1.0 / (1.0 + np.exp(-tissue))) * np.exp(-radial * 1.2) * (0.15 + 0.12 * density)
  return np.where(inside, (fat + glandular) * skin_falloff, 0.0)


def point_in(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
  """A random (row, col) of ``mask`` [H, W], away from its edge when the mask is large enough."""
  eroded = ndimage.binary_erosion(mask, iterations=6)
  candidates = np.argwhere(eroded if eroded.any() else mask)
  r, c = candidates[rng.integers(len(candidates))]
  return float(r), float(c)


def blob(
  rng: np.random.Generator,
  mask: np.ndarray,
  radius: float,
  contrast: float,
  center: tuple[float, float] | None = None,
) -> np.ndarray:
  """A dense mass with an irregular (lobulated) margin, inside the breast."""
  if center is None:
    center = point_in(rng, mask)
  height, width = mask.shape
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  angle = np.arctan2(rows - center[0], cols - center[1])
  lobes = (
    1.0
    + 0.25 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))
    + 0.15 * np.sin(5 * angle + rng.uniform(0, 2 * np.pi))
  )
  dist = np.hypot(rows - center[0], cols - center[1]) / (max(radius, 0.5) * lobes)
  return np.where(mask, contrast / (1.0 + np.exp(np.minimum((dist - 1.0) * 6.0, 50.0))), 0.0)


def acquisition_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
  """Gaussian detector noise on the breast pixels of ``image`` [H, W]; background stays 0."""
  return np.where(image > 0, image + rng.normal(0.0, 0.01, image.shape), 0.0)


def to_uint16(image: np.ndarray) -> np.ndarray:
  """[0, ~1] intensities -> uint16 [H, W] pixels, as a 16-bit mammogram stores them."""
  return np.clip(image * 40000.0, 0, 65535).astype(np.uint16)
