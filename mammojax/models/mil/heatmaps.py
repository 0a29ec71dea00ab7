"""MIL attention heatmaps: FPN-MIL's per-scale and aggregated lesion heatmaps, on the host.

The assembly FPN-MIL uses for its lesion-detection analysis, in numpy:

1. each patch's attention map at one scale ``[h, w]`` is upsampled bilinearly (corners aligned)
   to the patch size;
2. the patch maps are placed back into the image, overlapping ones averaged
   (:func:`mammojax.data.pipelines.patching.accumulate_patch_maps`), smoothed by a Gaussian and
   min-max normalised to [0, 1] inside the breast;
3. the aggregated heatmap is the mean of the scale heatmaps weighted by the scale aggregator's
   weights.

Boxes, IoU and detection reports from these heatmaps are in :mod:`mammojax.metrics.detection`,
overlay pictures in :mod:`mammojax.viz.overlays`. FPN-MIL normalises every patch map on its own
before accumulation (``patch_normalization=True``); the default here keeps the attention
comparable across patches (the softmax already runs over the whole bag), which also keeps coarse
scales with a single instance per patch informative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from mammojax.data.pipelines.patching import accumulate_patch_maps
from mammojax.nn.resize import resize_linear_align_corners


def upsample_aligned(maps: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize with aligned corners (torch ``align_corners=True``), in float64 on the host:
  [N, h, w] -> [N, S, S]. A 1-pixel axis is repeated."""
  maps = np.asarray(maps, np.float64)
  if maps.ndim != 3:
    raise ValueError(f"maps must be [N, h, w], got shape {maps.shape}")
  return resize_linear_align_corners(maps, (size, size), axes=(1, 2))


def _normalize(values: np.ndarray, region: np.ndarray) -> np.ndarray:
  """Min-max to [0, 1] over ``region``; 0 outside it (and everywhere for a constant map)."""
  if not region.any():
    return np.zeros_like(values)
  low, high = values[region].min(), values[region].max()
  scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
  return np.where(region, scaled, 0.0)


def scale_heatmap(
  attention: np.ndarray,
  coords: np.ndarray,
  image_shape: tuple[int, int],
  patch_size: int,
  *,
  patch_mask: np.ndarray | None = None,
  foreground: np.ndarray | None = None,
  smooth_sigma: float = 0.0,
  patch_normalization: bool = False,
) -> np.ndarray:
  """The heatmap [H, W] in [0, 1] of one scale.

  Args:
    attention: [P, h, w] attention of every patch's feature-map pixels (any scale).
    coords: [P, 2] (row, col) patch corners.
    image_shape: (H, W).
    patch_size: patch side in pixels.
    patch_mask: [P] bool, False for padded patches (ignored).
    foreground: [H, W] bool breast mask the heatmap is normalised in; default the pixels some
      patch covers.
    smooth_sigma: Gaussian smoothing in pixels (0 = none; FPN-MIL uses 10 on 512-pixel patches).
    patch_normalization: min-max normalise each patch map first, as FPN-MIL does.
  """
  attention = np.asarray(attention, np.float64)
  coords = np.asarray(coords)
  if patch_mask is not None:
    keep = np.asarray(patch_mask, bool)
    attention, coords = attention[keep], coords[keep]
  maps = upsample_aligned(attention, patch_size)
  if patch_normalization:
    low = maps.min(axis=(1, 2), keepdims=True)
    high = maps.max(axis=(1, 2), keepdims=True)
    maps = (maps - low) / (high - low + np.finfo(np.float16).eps)
  heatmap, count = accumulate_patch_maps(maps, coords, image_shape)
  heatmap = heatmap.astype(np.float64)
  if smooth_sigma > 0:
    heatmap = ndimage.gaussian_filter(heatmap, smooth_sigma)
  region = count > 0 if foreground is None else np.asarray(foreground, bool) & (count > 0)
  return _normalize(heatmap, region).astype(np.float32)


def aggregate_heatmaps(
  heatmaps: Mapping[Any, np.ndarray], weights: Sequence[float] | None = None
) -> np.ndarray:
  """Weighted mean of the scale heatmaps (weights, e.g. the scale aggregator's softmax,
  normalised to sum 1; equal by default), so [0, 1] heatmaps give a [0, 1] heatmap."""
  maps = list(heatmaps.values())
  if not maps:
    raise ValueError("aggregate_heatmaps needs at least one heatmap")
  weights = np.ones(len(maps)) if weights is None else np.asarray(weights, np.float64)
  if weights.shape != (len(maps),) or weights.sum() <= 0:
    raise ValueError(
      f"need one non-negative weight per heatmap ({len(maps)}) with a positive sum, got {weights}"
    )
  weights = weights / weights.sum()
  return sum(w * m.astype(np.float64) for w, m in zip(weights, maps)).astype(np.float32)
