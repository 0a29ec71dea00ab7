"""Masked-autoencoder reconstruction figures (the seed paper's Figure 2): for every acquired
contrast one row of a slice of the original, the masked input and the reconstruction
(matplotlib, the optional ``viz`` extra, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mammojax.viz.figures import save_png

COLUMN_TITLES = ("original", "masked input", "reconstruction")
# Masked patches in the masked input: a flat blue-grey, which no voxel of a grey colormap has.
_MASK_COLOUR = "#6f8faf"
# Thin outline of the masked patches on the reconstruction, so what was predicted is visible.
_OUTLINE_COLOUR = "#ffb000"
_WINDOW_PERCENTILES = (1.0, 99.0)


def masked_input(original: np.ndarray, masked: np.ndarray, fill: float = np.nan) -> np.ndarray:
  """``original [...]`` as float32 with the voxels where ``masked [...]`` is set replaced by
  ``fill`` (NaN by default, which the figure draws in the mask colour)."""
  out = np.array(original, dtype=np.float32)
  out[np.asarray(masked).astype(bool)] = fill
  return out


def mae_composite(
  original: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray
) -> np.ndarray:
  """The MAE picture of a reconstruction: ``reconstruction [...]`` in the masked voxels,
  ``original [...]`` in the visible ones (float32, the shape of ``original``)."""
  return np.where(np.asarray(masked).astype(bool), reconstruction, original).astype(np.float32)


def intensity_window(
  image: np.ndarray, percentiles: tuple[float, float] = _WINDOW_PERCENTILES
) -> tuple[float, float]:
  """``(low, high)``: the ``percentiles`` of the finite voxels of ``image [...]``, with
  ``high > low`` (``(0, 1)`` when no voxel is finite)."""
  values = np.asarray(image, dtype=np.float64)
  values = values[np.isfinite(values)]
  if not values.size:
    return 0.0, 1.0
  low, high = (float(v) for v in np.percentile(values, percentiles))
  return low, max(high, low + 1e-6)


def reconstruction_rows(
  present: np.ndarray, contrast_names: Sequence[str]
) -> list[tuple[int, str]]:
  """``(slot, name)`` of the rows the figure draws, top to bottom: the slots of ``present [K]``
  that hold an acquired contrast, in slot order."""
  present = np.asarray(present).reshape(-1)
  if len(contrast_names) != present.size:
    raise ValueError(
      f"reconstruction figure: contrast_names has {len(contrast_names)} names for "
      f"{present.size} slots of present"
    )
  rows = [(int(k), str(contrast_names[k])) for k in np.flatnonzero(present.astype(bool))]
  if not rows:
    raise ValueError("reconstruction figure: present marks no contrast as acquired")
  return rows


def _check_shapes(
  original: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray, present: np.ndarray
) -> None:
  if original.ndim != 3:
    raise ValueError(f"reconstruction figure: original {original.shape} is not [H, W, K]")
  for name, array in (("masked", masked), ("reconstruction", reconstruction)):
    if array.shape != original.shape:
      raise ValueError(
        f"reconstruction figure: {name} {array.shape} is not the [H, W, K] {original.shape} "
        "of original"
      )
  if present.shape != (original.shape[-1],):
    raise ValueError(
      f"reconstruction figure: present {present.shape} is not [K] with K={original.shape[-1]} "
      "the contrast slots of original"
    )


def reconstruction_figure(
  original: np.ndarray,
  masked: np.ndarray,
  reconstruction: np.ndarray,
  present: np.ndarray,
  contrast_names: Sequence[str],
  title: str = "",
) -> Any:
  """The matplotlib ``Figure`` of :func:`save_reconstruction_figure` (arguments as there): three
  axes per drawn row, in the order of :func:`reconstruction_rows`, each row labelled with its
  contrast name and drawn in one intensity window."""
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  original = np.asarray(original)
  masked = np.asarray(masked)
  reconstruction = np.asarray(reconstruction)
  present = np.asarray(present)
  _check_shapes(original, masked, reconstruction, present)
  rows = reconstruction_rows(present, contrast_names)
  masked = masked.astype(bool)

  height, width = original.shape[:2]
  panel = 2.2
  figure = Figure(
    figsize=(panel * len(COLUMN_TITLES) + 0.4, panel * len(rows) * height / max(width, 1) + 0.7),
    dpi=100,
  )
  FigureCanvasAgg(figure)
  cmap = matplotlib.colormaps["gray"].with_extremes(bad=_MASK_COLOUR)
  for row, (slot, name) in enumerate(rows):
    image, mask = original[..., slot], masked[..., slot]
    low, high = intensity_window(image)
    panels = (
      image.astype(np.float32),
      np.ma.masked_invalid(masked_input(image, mask)),
      mae_composite(image, mask, reconstruction[..., slot]),
    )
    for column, data in enumerate(panels):
      ax = figure.add_subplot(len(rows), len(COLUMN_TITLES), row * len(COLUMN_TITLES) + column + 1)
      ax.imshow(data, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
      if column == 2 and 0 < mask.sum() < mask.size:
        ax.contour(mask, levels=[0.5], colors=_OUTLINE_COLOUR, linewidths=0.6)
      if row == 0:
        ax.set_title(COLUMN_TITLES[column], fontsize=8)
      if column == 0:
        ax.set_ylabel(name, fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
  legend = "masked patches: blue-grey (input), outlined in amber (reconstruction)"
  figure.suptitle(f"{title}\n{legend}".strip(), fontsize=8)
  figure.tight_layout()
  return figure


def save_reconstruction_figure(
  path: str,
  original: np.ndarray,
  masked: np.ndarray,
  reconstruction: np.ndarray,
  present: np.ndarray,
  contrast_names: Sequence[str],
  title: str = "",
) -> str:
  """Writes a PNG (atomically) with one row per acquired contrast of one slice: the original,
  the masked input and the reconstruction (MAE convention: predicted masked patches, original
  visible ones); returns ``path``.

  Args:
    path: the PNG to write; its folder is created if needed.
    original: ``[H, W, K]`` float, the slice of every contrast slot.
    masked: ``[H, W, K]`` bool (or 0/1), set where the voxel belongs to a masked patch.
    reconstruction: ``[H, W, K]`` float, the model's output on the slice, on the intensity
      scale of ``original``.
    present: ``[K]`` bool (or 0/1), the slots that hold an acquired contrast; the others are not
      drawn.
    contrast_names: ``[K]`` names of the slots, the row labels.
    title: the figure's title.

  Raises:
    ValueError: the shapes disagree, or ``present`` marks no contrast.
  """
  figure = reconstruction_figure(original, masked, reconstruction, present, contrast_names, title)
  return save_png(figure, path)
