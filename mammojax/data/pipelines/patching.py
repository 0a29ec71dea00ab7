"""Cutting a full image into square patches on the host, and putting per-patch maps back.

Patches of ``patch_size`` pixels start every ``patch_size - int(patch_size * overlap)`` pixels
(FPN-MIL's step rule); when the last start does not reach the image edge one more patch is
placed flush with the edge, so every pixel is covered. An image smaller than a patch is padded
at the bottom / right with ``fill``. Patch coordinates are the (row, col) of the top-left pixel
in the image frame ('ij', the repository's convention), so padding never shifts them.

Background patches (foreground fraction at most ``min_foreground``) are dropped; their
coordinates go with them. The inverse, :func:`accumulate_patch_maps`, averages overlapping
patch maps pixel by pixel.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Patches:
  """Attributes:
  patches: [N, P, P] or [N, P, P, C] the kept patches.
  coords: [N, 2] int32 (row, col) of each patch's top-left pixel.
  image_shape: (H, W) of the image before padding.
  """

  patches: np.ndarray
  coords: np.ndarray
  image_shape: tuple[int, int]


def patch_starts(size: int, patch_size: int, overlap: float) -> np.ndarray:
  """Start offsets along one axis of ``size`` pixels; the last patch ends at the edge."""
  if patch_size < 1:
    raise ValueError(f"patch_size must be positive, got {patch_size}")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")
  step = patch_size - int(patch_size * overlap)
  last = max(size - patch_size, 0)
  starts = list(range(0, last + 1, step))
  if starts[-1] != last:
    starts.append(last)
  return np.asarray(starts, np.int32)


def grid_coords(image_shape: tuple[int, int], patch_size: int, overlap: float) -> np.ndarray:
  """All patch positions [N, 2] (row, col), row-major (sorted by row, then column)."""
  rows = patch_starts(image_shape[0], patch_size, overlap)
  cols = patch_starts(image_shape[1], patch_size, overlap)
  return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2).astype(np.int32)


def extract_patches(
  image: np.ndarray,
  patch_size: int,
  overlap: float = 0.0,
  *,
  foreground: np.ndarray | None = None,
  min_foreground: float = 0.0,
  fill: float = 0.0,
) -> Patches:
  """Cuts ``image`` into patches and drops the background ones.

  Args:
    image: [H, W] or [H, W, C].
    patch_size: side P of the square patches, pixels.
    overlap: fraction of a patch shared with the next one, in [0, 1).
    foreground: [H, W] bool breast mask; default ``image > fill`` (any channel).
    min_foreground: a patch is kept when more than this fraction of its pixels is foreground
      (0 keeps every patch that touches the breast).
    fill: value of the padding of images smaller than a patch.

  Returns:
    The kept patches [N, P, P(, C)] with their (row, col) coordinates [N, 2].
  """
  if image.ndim not in (2, 3):
    raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
  height, width = image.shape[:2]
  if foreground is None:
    foreground = image > fill if image.ndim == 2 else np.any(image > fill, axis=-1)
  if foreground.shape != (height, width):
    raise ValueError(f"foreground mask {foreground.shape} must match the image {(height, width)}")
  pad_h, pad_w = max(patch_size - height, 0), max(patch_size - width, 0)
  if pad_h or pad_w:
    pad = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (image.ndim - 2)
    image = np.pad(image, pad, constant_values=fill)
    foreground = np.pad(foreground, ((0, pad_h), (0, pad_w)))
  coords = grid_coords((height, width), patch_size, overlap)
  # Foreground fraction of every patch from an integral image: O(H W) whatever the overlap.
  integral = np.pad(np.cumsum(np.cumsum(foreground, 0, dtype=np.int64), 1), ((1, 0), (1, 0)))
  r, c = coords[:, 0], coords[:, 1]
  counts = (
    integral[r + patch_size, c + patch_size]
    - integral[r, c + patch_size]
    - integral[r + patch_size, c]
    + integral[r, c]
  )
  keep = counts > min_foreground * patch_size * patch_size
  coords = coords[keep]
  patches = (
    np.stack([image[i : i + patch_size, j : j + patch_size] for i, j in coords])
    if len(coords)
    else np.zeros((0, patch_size, patch_size) + image.shape[2:], image.dtype)
  )
  return Patches(patches=patches, coords=coords, image_shape=(height, width))


def accumulate_patch_maps(
  maps: np.ndarray, coords: np.ndarray, image_shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Places per-patch maps back into the image, averaging where patches overlap.

  Args:
    maps: [N, P, P] values at patch resolution (e.g. upsampled attention or the pixels).
    coords: [N, 2] (row, col) top-left corners, as :func:`extract_patches` returns them.
    image_shape: (H, W) of the image.

  Returns:
    ``(average [H, W] float32, count [H, W] int32)``; pixels no patch covers are 0 with count 0.
  """
  maps = np.asarray(maps)
  if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
    raise ValueError(f"maps must be [N, P, P], got shape {maps.shape}")
  if coords.shape != (maps.shape[0], 2):
    raise ValueError(f"coords must be [N, 2] = {(maps.shape[0], 2)}, got {coords.shape}")
  height, width = image_shape
  patch_size = maps.shape[1]
  total = np.zeros((height + patch_size, width + patch_size), np.float64)
  count = np.zeros(total.shape, np.int32)
  for value, (r, c) in zip(maps, coords):
    total[r : r + patch_size, c : c + patch_size] += value
    count[r : r + patch_size, c : c + patch_size] += 1
  total, count = total[:height, :width], count[:height, :width]
  average = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return average.astype(np.float32), count
