"""Segmentation figures: slices of a volume with the predicted and the ground-truth label maps
drawn as outlines (matplotlib, the optional ``viz`` extra, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mammojax.viz.figures import save_png

# Outline colours: the ground truth green, the prediction red (as the detection overlays).
_TRUTH_COLOUR = "lime"
_PREDICTION_COLOUR = "red"


def informative_slices(labels: np.ndarray, count: int) -> np.ndarray:
  """``count`` indices along axis 0 of ``labels [D, H, W]``: the slices with the most foreground
  voxels (in order of depth), or evenly spaced slices when there is no foreground."""
  depth = labels.shape[0]
  count = max(1, min(count, depth))
  foreground = (labels > 0).reshape(depth, -1).sum(axis=1)
  if not foreground.any():
    return np.linspace(0, depth - 1, count + 2)[1:-1].round().astype(int)
  return np.sort(np.argsort(-foreground, kind="stable")[:count])


def save_segmentation_figure(
  path: str,
  image: np.ndarray,
  prediction: np.ndarray,
  truth: np.ndarray | None = None,
  *,
  num_slices: int = 3,
  class_names: Sequence[str] = (),
  title: str = "",
) -> str:
  """Writes a PNG of axial slices of ``image [D, H, W]`` in grey with the outlines of every
  foreground class of ``prediction [D, H, W]`` (red) and ``truth [D, H, W]`` (green, when
  given); slices where the truth (else the prediction) has most foreground. Returns ``path``."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if image.ndim != 3 or prediction.shape != image.shape:
    raise ValueError(
      f"save_segmentation_figure: image {image.shape} and prediction {prediction.shape} must be "
      "the same [D, H, W]"
    )
  if truth is not None and truth.shape != image.shape:
    raise ValueError(
      f"save_segmentation_figure: truth {truth.shape} is not [D, H, W] {image.shape}"
    )
  slices = informative_slices(truth if truth is not None else prediction, num_slices)
  height, width = image.shape[1:]
  panel = 2.6
  figure = Figure(figsize=(panel * len(slices), panel * height / max(width, 1) + 0.6), dpi=100)
  FigureCanvasAgg(figure)
  low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
  for column, index in enumerate(slices):
    ax = figure.add_subplot(1, len(slices), column + 1)
    ax.imshow(image[index], cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
    for labels, colour in ((truth, _TRUTH_COLOUR), (prediction, _PREDICTION_COLOUR)):
      if labels is None:
        continue
      for value in np.unique(labels[index]):
        if value > 0:
          ax.contour(labels[index] == value, levels=[0.5], colors=colour, linewidths=1.0)
    ax.set_title(f"slice {index}", fontsize=7)
    ax.set_axis_off()
  legend = "green: ground truth, red: prediction" if truth is not None else "red: prediction"
  names = f" ({', '.join(class_names[1:])})" if len(class_names) > 1 else ""
  figure.suptitle(f"{title}{names}\n{legend}".strip(), fontsize=8)
  figure.tight_layout()
  return save_png(figure, path)
