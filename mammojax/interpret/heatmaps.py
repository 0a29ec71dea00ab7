"""Post-hoc lesion detection from MIL attention: heatmaps, boxes, IoU, reports, overlays.

The pipeline FPN-MIL uses for its lesion-detection analysis, on the host in numpy:

1. each patch's attention map at one scale ``[h, w]`` is upsampled bilinearly (corners aligned)
   to the patch size;
2. the patch maps are placed back into the image, overlapping ones averaged
   (:func:`mammojax.data.patching.accumulate_patch_maps`), smoothed by a Gaussian and min-max
   normalised to [0, 1] inside the breast;
3. the aggregated heatmap is the mean of the scale heatmaps weighted by the scale aggregator's
   weights;
4. boxes: pixels above the ``quantile`` of the heatmap and above ``min_value`` form connected
   components (``scipy.ndimage.label``); components smaller than ``min_area`` are dropped; each
   box scores the heatmap mass it contains; non-maximum suppression, at most ``max_boxes``, and
   boxes lying mostly inside another are removed.

Boxes are ``(x0, y0, x1, y1)`` pixels (x = column, y = row, exclusive upper corner), the format
of the records' ground-truth boxes. FPN-MIL normalises every patch map on its own before
accumulation (``patch_normalization=True``); the default here keeps the attention comparable
across patches (the softmax already runs over the whole bag), which also keeps coarse scales
with a single instance per patch informative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from mammojax.data.patching import accumulate_patch_maps

DEFAULT_IOU_THRESHOLDS = (0.1, 0.25, 0.5)


def upsample_aligned(maps: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize with aligned corners (torch ``align_corners=True``): [N, h, w] -> [N, S, S].

  A 1-pixel axis is repeated.
  """
  maps = np.asarray(maps, np.float64)
  if maps.ndim != 3:
    raise ValueError(f"maps must be [N, h, w], got shape {maps.shape}")
  n, h, w = maps.shape
  rows = np.linspace(0.0, h - 1.0, size) if h > 1 else np.zeros(size)
  cols = np.linspace(0.0, w - 1.0, size) if w > 1 else np.zeros(size)
  r0 = np.floor(rows).astype(int)
  c0 = np.floor(cols).astype(int)
  r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
  fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
  top = maps[:, r0][:, :, c0] * (1 - fc) + maps[:, r0][:, :, c1] * fc
  bottom = maps[:, r1][:, :, c0] * (1 - fc) + maps[:, r1][:, :, c1] * fc
  return top * (1 - fr) + bottom * fr


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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of boxes [N, 4] and [K, 4] (x0, y0, x1, y1) -> [N, K]."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
  height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
  intersection = np.maximum(width, 0) * np.maximum(height, 0)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  union = area_a[:, None] + area_b[None, :] - intersection
  return intersection / np.maximum(union, np.finfo(np.float64).eps)


def heatmap_boxes(
  heatmap: np.ndarray,
  *,
  quantile: float = 0.98,
  min_value: float = 0.5,
  min_area: int = 230,
  max_boxes: int = 3,
  nms_iou: float = 0.5,
) -> np.ndarray:
  """Boxes of the hot regions of a [0, 1] heatmap [H, W]: [K, 5] (x0, y0, x1, y1, score).

  Defaults are FPN-MIL's (quantile 0.98, value above 0.5, components of at least 230 pixels,
  three boxes, NMS at IoU 0.5); scale ``min_area`` with the image area for small images.
  Scores are the heatmap mass inside each box; boxes come sorted by score.
  """
  heatmap = np.asarray(heatmap, np.float64)
  if heatmap.ndim != 2:
    raise ValueError(f"heatmap must be [H, W], got shape {heatmap.shape}")
  hot = (heatmap > np.quantile(heatmap, quantile)) & (heatmap > min_value)
  labels, _ = ndimage.label(hot)
  boxes = []
  for index, found in enumerate(ndimage.find_objects(labels), start=1):
    if found is None or (labels[found] == index).sum() < min_area:
      continue
    rows, cols = found
    if (rows.stop - rows.start) * (cols.stop - cols.start) < min_area:
      continue
    score = heatmap[rows, cols].sum()
    boxes.append([cols.start, rows.start, cols.stop, rows.stop, score])
  if not boxes:
    return np.zeros((0, 5), np.float32)
  boxes = np.asarray(sorted(boxes, key=lambda b: -b[4]), np.float64)
  kept = []
  for i in range(len(boxes)):
    if all(box_iou(boxes[i, :4], boxes[j, :4])[0, 0] <= nms_iou for j in kept):
      kept.append(i)
  boxes = boxes[kept[:max_boxes]]
  # Drop boxes lying for more than `nms_iou` of their area inside another kept box.
  xy = boxes[:, :4]
  width = np.minimum(xy[:, None, 2], xy[None, :, 2]) - np.maximum(xy[:, None, 0], xy[None, :, 0])
  height = np.minimum(xy[:, None, 3], xy[None, :, 3]) - np.maximum(xy[:, None, 1], xy[None, :, 1])
  areas = (xy[:, 2] - xy[:, 0]) * (xy[:, 3] - xy[:, 1])
  inside = np.maximum(width, 0) * np.maximum(height, 0) / areas[:, None]
  np.fill_diagonal(inside, 0.0)
  contained = (inside >= nms_iou).any(axis=1)
  return boxes[~contained].astype(np.float32)


def detection_report(
  predicted: Sequence[np.ndarray],
  truth: Sequence[np.ndarray],
  iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
) -> dict[str, float]:
  """Detection metrics over images.

  Args:
    predicted: per image, boxes [K, 4 or 5] (a fifth column, the score, is ignored).
    truth: per image, ground-truth boxes [M, 4]; images without any are skipped.
    iou_thresholds: thresholds of the recall / precision entries.

  Returns:
    ``recall_iou<t>``: fraction of ground-truth boxes some prediction overlaps with IoU >= t;
    ``precision_iou<t>``: fraction of predicted boxes (on images with ground truth) that overlap
    some ground-truth box with IoU >= t; ``mean_iou``: best IoU of each ground-truth box, averaged;
    ``num_images``, ``num_truth``, ``num_predicted``.
  """
  if len(predicted) != len(truth):
    raise ValueError(f"{len(predicted)} predicted box lists for {len(truth)} images")
  best_per_truth, best_per_prediction = [], []
  for pred, gt in zip(predicted, truth):
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    if not len(gt):
      continue
    pred = np.asarray(pred, np.float64)
    pred = pred.reshape(-1, pred.shape[-1] if pred.size else 4)[:, :4]
    iou = box_iou(pred, gt) if len(pred) else np.zeros((0, len(gt)))
    best_per_truth.extend(iou.max(axis=0) if len(pred) else np.zeros(len(gt)))
    best_per_prediction.extend(iou.max(axis=1))
  truth_iou = np.asarray(best_per_truth)
  pred_iou = np.asarray(best_per_prediction)
  report: dict[str, float] = {
    "num_images": float(sum(len(np.asarray(g).reshape(-1, 4)) > 0 for g in truth)),
    "num_truth": float(truth_iou.size),
    "num_predicted": float(pred_iou.size),
    "mean_iou": float(truth_iou.mean()) if truth_iou.size else float("nan"),
  }
  for t in iou_thresholds:
    report[f"recall_iou{t:g}"] = float((truth_iou >= t).mean()) if truth_iou.size else float("nan")
    report[f"precision_iou{t:g}"] = float((pred_iou >= t).mean()) if pred_iou.size else float("nan")
  return report


def save_overlay(
  path: str,
  image: np.ndarray,
  heatmap: np.ndarray | None = None,
  predicted: np.ndarray | None = None,
  truth: np.ndarray | None = None,
  title: str = "",
) -> None:
  """Writes a PNG: the image in grey, the heatmap in colour on top, predicted boxes in red
  (with scores), ground-truth boxes in green. All boxes in the image's pixel frame."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  height, width = image.shape[:2]
  figure = Figure(figsize=(4.0, 4.0 * height / max(width, 1) + 0.4), dpi=100)
  FigureCanvasAgg(figure)
  ax = figure.add_subplot(1, 1, 1)
  ax.imshow(image, cmap="gray")
  if heatmap is not None:
    ax.imshow(np.ma.masked_less_equal(heatmap, 0.0), cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
  for boxes, colour in ((truth, "lime"), (predicted, "red")):
    if boxes is None:
      continue
    for box in np.asarray(boxes).reshape(-1, np.asarray(boxes).shape[-1] if np.size(boxes) else 4):
      ax.add_patch(
        Rectangle(
          (box[0], box[1]),
          box[2] - box[0],
          box[3] - box[1],
          fill=False,
          edgecolor=colour,
          linewidth=1.2,
        )
      )
      if len(box) > 4:
        ax.text(box[0], box[1], f"{box[4]:.0f}", color=colour, fontsize=6, va="bottom")
  ax.set_axis_off()
  if title:
    ax.set_title(title, fontsize=8)
  figure.tight_layout()
  figure.savefig(path)
