"""Host-side numpy augmentations for Grain pipelines (``.random_map``), training only.

Each class is a top-level, picklable ``grain.transforms.RandomMap`` that draws its randomness from
the ``np.random.Generator`` Grain passes per element, so a seeded pipeline is reproducible and its
iterator state checkpoints. They act on named fields of an example dict; images are ``[H, W]`` or
``[H, W, C]`` and keep their dtype.

- :class:`RandomFlip` mirrors every listed image with one draw, so current and prior stay
  consistent; a ground-truth ``displacement`` ``[H, W, 2]`` (pixels, 'ij') is mirrored with them.
- :class:`RandomAffine` applies one small rotation / scale / shift to every listed image (and
  transforms a displacement field consistently); the fill value is each image's minimum (its
  background, also after normalisation).
- :class:`IntensityJitter` scales and shifts float images (normalised units), independently per
  image by default, since two exams differ in exposure.

:func:`train_augmentations` builds the list from an :class:`AugmentConfig`; evaluation pipelines
simply do not add them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from scipy import ndimage

IMAGE_KEYS = ("current_image", "previous_image")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation strengths; zero disables one kind.

  Attributes:
    flip_p: probability of a left-right mirror.
    rotation_deg: maximum absolute rotation (degrees).
    scale: maximum relative zoom (0.05 = +-5%).
    shift: maximum shift as a fraction of the image size.
    contrast: maximum relative intensity scale change.
    brightness: maximum intensity shift (normalised units).
    keys: image fields to transform.
  """

  flip_p: float = 0.5
  rotation_deg: float = 5.0
  scale: float = 0.05
  shift: float = 0.03
  contrast: float = 0.1
  brightness: float = 0.1
  keys: tuple[str, ...] = IMAGE_KEYS


def train_augmentations(config: AugmentConfig) -> list[grain.transforms.RandomMap]:
  """The transforms a training pipeline applies, in order (after decoding to float)."""
  out: list[grain.transforms.RandomMap] = []
  if config.flip_p > 0:
    out.append(RandomFlip(config.keys, config.flip_p))
  if config.rotation_deg > 0 or config.scale > 0 or config.shift > 0:
    out.append(RandomAffine(config.keys, config.rotation_deg, config.scale, config.shift))
  if config.contrast > 0 or config.brightness > 0:
    out.append(IntensityJitter(config.keys, config.contrast, config.brightness))
  return out


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors all ``keys`` left-right together with probability ``p``."""

  def __init__(
    self, keys: Sequence[str] = IMAGE_KEYS, p: float = 0.5, displacement_key: str = "displacement"
  ):
    self.keys = tuple(keys)
    self.p = float(p)
    self.displacement_key = displacement_key

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    out = dict(element)
    for key in self.keys:
      out[key] = np.ascontiguousarray(np.asarray(element[key])[:, ::-1])
    if self.displacement_key in element:
      field = np.array(element[self.displacement_key][:, ::-1], copy=True)
      field[..., 1] = -field[..., 1]
      out[self.displacement_key] = field
    return out


class RandomAffine(grain.transforms.RandomMap):
  """One random rotation + isotropic zoom + shift (about the centre) for all ``keys``."""

  def __init__(
    self,
    keys: Sequence[str] = IMAGE_KEYS,
    rotation_deg: float = 5.0,
    scale: float = 0.05,
    shift: float = 0.03,
    displacement_key: str = "displacement",
  ):
    self.keys = tuple(keys)
    self.rotation_deg = float(rotation_deg)
    self.scale = float(scale)
    self.shift = float(shift)
    self.displacement_key = displacement_key

  def sample_matrix(
    self, shape: tuple[int, int], rng: np.random.Generator
  ) -> tuple[np.ndarray, np.ndarray]:
    """``(M [2, 2], c [2])``: output pixel ``y`` reads input pixel ``M @ y + c`` ('ij')."""
    angle = math.radians(rng.uniform(-self.rotation_deg, self.rotation_deg))
    zoom = 1.0 + rng.uniform(-self.scale, self.scale)
    shift = rng.uniform(-self.shift, self.shift, size=2) * np.asarray(shape)
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    matrix = np.array([[cos, -sin], [sin, cos]])
    center = (np.asarray(shape, np.float64) - 1) / 2
    return matrix, center - matrix @ center - shift

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    first = np.asarray(element[self.keys[0]])
    matrix, offset = self.sample_matrix(first.shape[:2], rng)
    out = dict(element)
    for key in self.keys:
      image = np.asarray(element[key])
      fill = float(image.min())
      out[key] = _per_channel(
        image,
        lambda c: ndimage.affine_transform(c, matrix, offset, order=1, mode="constant", cval=fill),
      ).astype(image.dtype)
    if self.displacement_key in element:
      # prior(x + u(x)) ~ current(x) holds after the warp for u'(y) = M^-1 u(M y + c).
      field = _per_channel(
        np.asarray(element[self.displacement_key], np.float32),
        lambda c: ndimage.affine_transform(c, matrix, offset, order=1, mode="nearest"),
      )
      out[self.displacement_key] = (field @ np.linalg.inv(matrix).T).astype(np.float32)
    return out


class IntensityJitter(grain.transforms.RandomMap):
  """``x * (1 + a) + b`` with ``a ~ U(-contrast, contrast)``, ``b ~ U(-brightness, brightness)``.

  Float images only (apply after normalisation); ``shared`` uses one draw for all keys. An
  all-zero image (an absent prior) is left at zero.
  """

  def __init__(
    self,
    keys: Sequence[str] = IMAGE_KEYS,
    contrast: float = 0.1,
    brightness: float = 0.1,
    shared: bool = False,
  ):
    self.keys = tuple(keys)
    self.contrast = float(contrast)
    self.brightness = float(brightness)
    self.shared = shared

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = dict(element)
    draw = None
    for key in self.keys:
      image = np.asarray(element[key])
      if image.dtype.kind != "f":
        raise TypeError(
          f"IntensityJitter needs float images; {key!r} is {image.dtype}. "
          "Apply it after decoding / normalisation."
        )
      if draw is None or not self.shared:
        draw = (
          rng.uniform(-self.contrast, self.contrast),
          rng.uniform(-self.brightness, self.brightness),
        )
      if not image.any():
        continue
      out[key] = (image * (1.0 + draw[0]) + draw[1]).astype(image.dtype)
    return out


def _per_channel(image: np.ndarray, fn) -> np.ndarray:
  if image.ndim == 2:
    return fn(image)
  return np.stack([fn(image[..., c]) for c in range(image.shape[-1])], axis=-1)
