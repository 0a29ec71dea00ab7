"""Lesion detection from heatmaps: box IoU, heatmap -> boxes, and detection reports (numpy).

Boxes: pixels above the ``quantile`` of the heatmap and above ``min_value`` form connected
components (``scipy.ndimage.label``); components smaller than ``min_area`` are dropped; each box
scores the heatmap mass it contains; non-maximum suppression, at most ``max_boxes``, and boxes
lying mostly inside another are removed.

Boxes are ``(x0, y0, x1, y1)`` pixels (x = column, y = row, exclusive upper corner), the format
of the records' ground-truth boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

DEFAULT_IOU_THRESHOLDS = (0.1, 0.25, 0.5)


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
