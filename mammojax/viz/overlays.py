"""Overlay pictures: an image with its heatmap, predicted and ground-truth boxes (matplotlib,
the optional ``viz`` extra, imported lazily)."""

from __future__ import annotations

import numpy as np

from mammojax.viz.figures import save_png


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
  save_png(figure, path)
