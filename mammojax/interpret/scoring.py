"""Scores of attribution maps against a known region: the pointing game and the positive mass
inside (numpy, on host, after the maps are computed).

The region is where the evidence is known to be: the changing region of the synthetic data, or
lesion boxes (:func:`boxes_to_mask`). Maps are ``[B, H, W]`` (GradCAM) or ``[B, H, W, C]`` pixel
attributions, whose channels are summed first, with their sign (:func:`spatial_maps`).

Scores are float ``[B]`` with NaN for an example that cannot be scored (empty region, no usable
map, see each function); a NaN is not a miss, and :func:`summarize` averages over the scorable
examples only and counts the others.

* :func:`pointing_game` (Zhang et al. 2016, "Top-down neural attention by excitation
  backprop"): 1 when the map's maximum lies in the region dilated by ``tolerance`` pixels (a
  Euclidean disc, the paper's 15-pixel tolerance), else 0.
* :func:`positive_fraction_inside`: the share of the positive attribution mass that lies in the
  region (1 = all evidence inside; a map spread uniformly scores the region's area fraction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

TIES = ("all", "any")


def spatial_maps(maps: Any) -> np.ndarray:
  """``[B, H, W]`` float64 maps: ``[B, H, W, C]`` attributions summed over channels (signed, so
  that channels of opposite sign cancel as they do in the model's sum), ``[B, H, W]`` as is."""
  maps = np.asarray(maps, np.float64)
  if maps.ndim == 4:
    return maps.sum(axis=-1)
  if maps.ndim != 3:
    raise ValueError(f"expected maps [B, H, W] or [B, H, W, C], got shape {maps.shape}")
  return maps


def _regions(regions: Any, shape: tuple[int, ...]) -> np.ndarray:
  """``regions`` ``[B, H, W]`` (or one ``[H, W]`` for the whole batch) as bool ``[B, H, W]``."""
  regions = np.asarray(regions)
  if regions.shape not in (shape, shape[1:]):
    raise ValueError(f"regions {regions.shape} do not match maps {shape} (or {shape[1:]})")
  return np.broadcast_to(regions.astype(bool), shape)


def _dilate(region: np.ndarray, tolerance: float) -> np.ndarray:
  """``region`` ``[H, W]`` grown by every pixel within Euclidean distance ``tolerance``."""
  if tolerance <= 0:
    return region
  # Distance from each pixel to the nearest region pixel; <= tolerance is a disc dilation.
  return ndimage.distance_transform_edt(~region) <= tolerance


def pointing_game(
  maps: Any, regions: Any, *, tolerance: float = 0, ties: str = "all"
) -> np.ndarray:
  """The pointing game: whether each map's maximum falls in its region.

  Args:
    maps: ``[B, H, W]`` or ``[B, H, W, C]`` (channels summed, :func:`spatial_maps`).
    regions: bool ``[B, H, W]``, or ``[H, W]`` for every example.
    tolerance: pixels; the region is dilated by a Euclidean disc of this radius (pixels whose
      centre lies within ``tolerance`` of a region pixel's centre), as the paper's 15 px.
    ties: when several pixels share the maximum (exact equality, e.g. the blocks of a
      nearest-upsampled GradCAM): ``'all'`` = a hit only if every maximal pixel is inside (a
      plateau reaching outside does not point at the region), ``'any'`` = a hit if one is.
  Returns:
    float ``[B]``: 1.0 hit, 0.0 miss, NaN not scorable: an empty region, a map with a
    non-finite value, or a constant map (every pixel maximal: it points nowhere, and a
    tie rule would make it a hit for 'any' and a miss for 'all').
  """
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
  if tolerance < 0:
    raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
  maps = spatial_maps(maps)
  regions = _regions(regions, maps.shape)
  scores = np.full(maps.shape[0], np.nan)
  for i, (heat, region) in enumerate(zip(maps, regions)):
    if not region.any() or not np.isfinite(heat).all() or heat.max() == heat.min():
      continue
    inside = _dilate(region, tolerance)[heat == heat.max()]
    scores[i] = float(inside.all() if ties == "all" else inside.any())
  return scores


def positive_fraction_inside(maps: Any, regions: Any) -> np.ndarray:
  """The share of each map's positive mass inside its region.

  Args:
    maps: ``[B, H, W]`` or ``[B, H, W, C]`` (channels summed, :func:`spatial_maps`).
    regions: bool ``[B, H, W]``, or ``[H, W]`` for every example.
  Returns:
    float ``[B]`` in [0, 1]: ``sum(max(map, 0) inside) / sum(max(map, 0))``; NaN when the region
    is empty, the map has no positive value, or a non-finite one.
  """
  maps = spatial_maps(maps)
  regions = _regions(regions, maps.shape)
  positive = np.maximum(maps, 0.0)
  total = positive.sum(axis=(1, 2))
  inside = np.where(regions, positive, 0.0).sum(axis=(1, 2))
  scorable = regions.any(axis=(1, 2)) & (total > 0) & np.isfinite(maps).all(axis=(1, 2))
  return np.where(scorable, inside / np.where(scorable, total, 1.0), np.nan)


def boxes_to_mask(boxes: Any, shape: Sequence[int]) -> np.ndarray:
  """The union of ``boxes`` as a mask.

  Args:
    boxes: ``[N, 4]`` ``(x0, y0, x1, y1)`` pixels, x = column, y = row, the upper corner
      exclusive (the records' format, :mod:`mammojax.metrics.detection`): integer boxes cover
      columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1``, like ``mask[y0:y1, x0:x1]``. A pixel
      is inside when its centre is (``x0 <= col + 0.5 < x1``), which is that rule for integers
      and the natural one for fractional boxes. Parts outside the image are dropped; boxes with
      ``x1 <= x0`` or ``y1 <= y0`` (padding rows of zeros) cover nothing.
    shape: ``(H, W)``.
  Returns:
    bool ``[H, W]``.
  """
  height, width = shape
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  cols = np.arange(width) + 0.5
  rows = np.arange(height) + 0.5
  mask = np.zeros((height, width), bool)
  for x0, y0, x1, y1 in boxes:
    in_cols = (x0 <= cols) & (cols < x1)
    in_rows = (y0 <= rows) & (rows < y1)
    mask |= in_rows[:, None] & in_cols[None, :]
  return mask


def summarize(scores: Mapping[str, Any]) -> dict[str, dict[str, float | int | None]]:
  """Per score name, JSON-ready: ``mean`` over the scorable (non-NaN) examples (None when there
  is none), ``count`` of scorable examples and ``unscorable`` of NaN ones.

  Args:
    scores: name -> per-example scores (e.g. ``[B]`` from :func:`pointing_game`; bool is fine).
  """
  summary = {}
  for name, values in scores.items():
    values = np.asarray(values, np.float64).ravel()
    scorable = values[~np.isnan(values)]
    mean = float(scorable.mean()) if scorable.size else None
    summary[str(name)] = {
      "mean": mean if mean is None or math.isfinite(mean) else None,
      "count": int(scorable.size),
      "unscorable": int(values.size - scorable.size),
    }
  return summary
