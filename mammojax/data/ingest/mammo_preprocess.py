"""Mammogram preprocessing: breast segmentation and crop, orientation, aspect-preserving resize.

The pipeline for one image ``[H, W]`` (float, larger = brighter) is:

1. Segment the breast: threshold a downsampled copy at ``threshold`` of the intensity range,
   open it to cut thin bridges, keep the largest connected component and fill its holes. Burned-in
   labels and markers are separate components and vanish; pixels outside the breast become 0.
2. Crop to the breast's bounding box.
3. Orient: mirror the image so every breast has its chest wall on the left (the breast points
   right). ``orientation='laterality'`` mirrors the side named ``flip_laterality`` (right breasts
   by default, which DICOM stores with the chest wall on the right); ``'auto'`` mirrors when the
   right half holds more breast than the left; ``'none'`` leaves the image as it is.
4. Stretch breast intensities to the full uint16 range (background stays 0).
5. Resize preserving aspect ratio to fit ``height x width``, then pad with 0 on the right (away
   from the chest wall) and equally top and bottom.

:class:`Geometry` records the crop, mirror, scale and padding so annotations (lesion boxes) can be
mapped into output pixels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import ndimage

UINT16_MAX = 65535
ORIENTATIONS = ("laterality", "auto", "none")
INTENSITIES = ("minmax", "unit")


@dataclasses.dataclass(frozen=True)
class MammoPreprocessConfig:
  """Preprocessing settings; recorded verbatim in the dataset manifest.

  Attributes:
    height, width: output size in pixels.
    orientation: 'laterality', 'auto' or 'none' (see the module docstring).
    flip_laterality: side mirrored when ``orientation='laterality'``.
    crop: segment and crop the breast; False keeps the full field of view.
    threshold: breast / background threshold as a fraction of the intensity range.
    mask_max_side: segmentation runs on a copy downsampled to at most this many pixels per side.
    intensity: ``'minmax'`` stretches each image's (breast) range to 0..65535; ``'unit'`` keeps
      absolute intensities of images already in [0, 1] (stored as ``round(x * 65535)``, so a
      model can read the raw values back, as Temporal-GradCam's ResNet takes its slices).
  """

  height: int = 1024
  width: int = 832
  orientation: str = "laterality"
  flip_laterality: str = "R"
  crop: bool = True
  threshold: float = 0.05
  mask_max_side: int = 512
  intensity: str = "minmax"

  def __post_init__(self):
    if self.height < 1 or self.width < 1:
      raise ValueError(f"output size must be positive, got {self.height}x{self.width}")
    if self.orientation not in ORIENTATIONS:
      raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
    if self.flip_laterality not in ("L", "R"):
      raise ValueError(f"flip_laterality must be 'L' or 'R', got {self.flip_laterality!r}")
    if not 0.0 < self.threshold < 1.0:
      raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
    if self.intensity not in INTENSITIES:
      raise ValueError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where the output pixels came from.

  Attributes:
    crop: ``(y0, x0, y1, x1)`` of the kept region in source pixels (end exclusive).
    flipped: whether the cropped region was mirrored left-right.
    scale: output pixels per source pixel.
    offset: ``(row, col)`` of the resized image's top-left corner in the padded output.
  """

  crop: tuple[int, int, int, int]
  flipped: bool
  scale: float
  offset: tuple[int, int]

  def map_boxes(self, boxes: np.ndarray) -> np.ndarray:
    """Maps boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` in source pixel edges to output pixels."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    y0, x0, y1, x1 = self.crop
    xs = boxes[:, [0, 2]] - x0
    ys = boxes[:, [1, 3]] - y0
    if self.flipped:
      xs = (x1 - x0) - xs[:, ::-1]
    xs = np.clip(xs, 0, x1 - x0) * self.scale + self.offset[1]
    ys = np.clip(ys, 0, y1 - y0) * self.scale + self.offset[0]
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)


def breast_mask(pixels: np.ndarray, threshold: float = 0.05, max_side: int = 512) -> np.ndarray:
  """Boolean ``[H, W]`` mask of the largest bright connected region (the breast).

  Raises:
    ValueError: when the image is constant or nothing exceeds the threshold.
  """
  lo, hi = float(pixels.min()), float(pixels.max())
  if hi <= lo:
    raise ValueError("image is constant (blank); no breast to segment")
  stride = max(1, math.ceil(max(pixels.shape) / max_side))
  small = pixels[::stride, ::stride]
  fg = small > lo + threshold * (hi - lo)
  fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool))
  labels, count = ndimage.label(fg)
  if count == 0:
    raise ValueError(
      f"no pixel exceeds {threshold:.0%} of the intensity range; no breast found "
      "(lower the threshold or check the image)"
    )
  sizes = np.bincount(labels.ravel())[1:]
  mask = ndimage.binary_fill_holes(labels == (int(np.argmax(sizes)) + 1))
  mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
  if stride > 1:
    mask = mask.repeat(stride, axis=0).repeat(stride, axis=1)
  return mask[: pixels.shape[0], : pixels.shape[1]]


def preprocess_mammogram(
  pixels: np.ndarray, laterality: str | None, config: MammoPreprocessConfig
) -> tuple[np.ndarray, Geometry]:
  """Runs the whole pipeline on one image.

  Args:
    pixels: ``[H, W]`` float, larger = brighter (as :mod:`mammojax.data.ingest.readers` returns).
    laterality: 'L', 'R' or None (needed only for ``orientation='laterality'``).
    config: the settings.

  Returns:
    ``([height, width] uint16, Geometry)``.

  Raises:
    ValueError: for a blank image, or a missing laterality under ``orientation='laterality'``.
  """
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim != 2:
    raise ValueError(f"expected a 2-D image [H, W], got shape {pixels.shape}")
  if config.crop:
    mask = breast_mask(pixels, config.threshold, config.mask_max_side)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    crop = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    region = pixels[crop[0] : crop[2], crop[1] : crop[3]]
    mask = mask[crop[0] : crop[2], crop[1] : crop[3]]
  else:
    crop = (0, 0) + pixels.shape
    region = pixels
    mask = np.ones(pixels.shape, bool)
  flipped = _should_flip(mask, laterality, config)
  if flipped:
    region, mask = region[:, ::-1], mask[:, ::-1]
  if config.intensity == "unit":
    lo, hi = float(region.min()), float(region.max())
    if lo < 0.0 or hi > 1.0:
      raise ValueError(
        f"intensities span [{lo:.4g}, {hi:.4g}], not [0, 1]; use --intensity=minmax for images "
        "that are not already scaled to [0, 1]"
      )
    scaled = np.where(mask, region * UINT16_MAX, 0.0)
  else:
    lo, hi = float(region[mask].min()), float(region[mask].max())
    scaled = np.where(mask, (region - lo) * (UINT16_MAX / max(hi - lo, 1e-6)), 0.0)
  resized, scale = _fit(scaled.astype(np.float32), config.height, config.width)
  out = np.zeros((config.height, config.width), np.uint16)
  top = (config.height - resized.shape[0]) // 2
  out[top : top + resized.shape[0], : resized.shape[1]] = np.clip(
    np.rint(resized), 0, UINT16_MAX
  ).astype(np.uint16)
  return out, Geometry(crop=crop, flipped=flipped, scale=scale, offset=(top, 0))


def _should_flip(mask: np.ndarray, laterality: str | None, config: MammoPreprocessConfig) -> bool:
  if config.orientation == "none":
    return False
  if config.orientation == "laterality":
    if laterality not in ("L", "R"):
      raise ValueError(
        "laterality unknown (neither the file header nor the CSV gives L or R); "
        "fill the CSV's laterality column or use orientation='auto'"
      )
    return laterality == config.flip_laterality
  half = mask.shape[1] // 2
  return int(mask[:, mask.shape[1] - half :].sum()) > int(mask[:, :half].sum())


def _fit(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, float]:
  """Resizes ``[h, w]`` to fit inside ``height x width`` keeping aspect (antialiased)."""
  from PIL import Image

  h, w = image.shape
  scale = min(height / h, width / w)
  new_h = min(height, max(1, round(h * scale)))
  new_w = min(width, max(1, round(w * scale)))
  if (new_h, new_w) == (h, w):
    return image, 1.0
  resized = Image.fromarray(np.ascontiguousarray(image, np.float32)).resize(
    (new_w, new_h), Image.Resampling.BILINEAR
  )
  return np.asarray(resized), scale


def load_mammogram(
  path: str, laterality: str | None, config: MammoPreprocessConfig
) -> tuple[np.ndarray, Geometry]:
  """Reads an image file and preprocesses it; ``laterality`` (from the CSV) overrides the header.

  Raises:
    ImageReadError: the file is missing, unreadable, or holds no breast to segment.
  """
  from mammojax.data.ingest.readers import ImageReadError, read_image

  image = read_image(path)
  try:
    return preprocess_mammogram(image.pixels, laterality or image.laterality, config)
  except ValueError as e:
    raise ImageReadError(path, str(e)) from None
