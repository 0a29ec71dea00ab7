"""Figures for 2D registration results: images side by side and the deformed grid.

Displacements are ``[H, W, 2]`` in pixels, 'ij' order, with ``warped(x) = moving(x + u(x))``
(``mammojax/nn/warp.py``). The deformed grid draws the lines of the map ``phi(x) = x + u(x)``:
where they bunch up the warped image samples the moving image densely (it is stretched), and
crossing lines are folds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mammojax.viz.figures import save_png


def plot_deformed_grid(
  ax,
  displacement: np.ndarray,
  *,
  spacing: int | None = None,
  color: str = "tab:red",
  linewidth: float = 0.8,
) -> None:
  """Draws the grid lines of ``phi(x) = x + u(x)`` on a matplotlib axes (image coordinates).

  Args:
    displacement: ``[H, W, 2]`` pixels, 'ij'.
    spacing: pixels between drawn lines (default: about 14 lines per side).
  """
  displacement = np.asarray(displacement, np.float32)
  if displacement.ndim != 3 or displacement.shape[-1] != 2:
    raise ValueError(f"displacement must be [H, W, 2] (pixels, 'ij'), got {displacement.shape}")
  height, width = displacement.shape[:2]
  spacing = spacing or max(1, max(height, width) // 14)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  mapped_rows = rows + displacement[..., 0]
  mapped_cols = cols + displacement[..., 1]
  for r in range(0, height, spacing):
    ax.plot(mapped_cols[r, :], mapped_rows[r, :], color=color, linewidth=linewidth)
  for c in range(0, width, spacing):
    ax.plot(mapped_cols[:, c], mapped_rows[:, c], color=color, linewidth=linewidth)
  ax.set_xlim(-0.5, width - 0.5)
  ax.set_ylim(height - 0.5, -0.5)
  ax.set_aspect("equal")


def save_registration_figure(
  path: str,
  moving: np.ndarray,
  fixed: np.ndarray,
  warped: np.ndarray,
  displacement: np.ndarray,
  titles: Sequence[str] | None = None,
) -> None:
  """One row per example: moving, fixed, warped, and the deformed grid over the moving image.

  Args:
    path: output image file (PNG).
    moving, fixed, warped: ``[N, H, W]`` or ``[N, H, W, 1]`` (or a single ``[H, W]`` image).
    displacement: ``[N, H, W, 2]`` (or ``[H, W, 2]``), pixels, 'ij'.
    titles: optional per-row labels.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  moving, fixed, warped = (_as_stack(x) for x in (moving, fixed, warped))
  displacement = np.asarray(displacement, np.float32)
  if displacement.ndim == 3:
    displacement = displacement[None]
  count = moving.shape[0]
  if not (fixed.shape[0] == warped.shape[0] == displacement.shape[0] == count):
    raise ValueError(
      f"need the same number of examples, got moving {moving.shape}, fixed "
      f"{fixed.shape}, warped {warped.shape}, displacement {displacement.shape}"
    )
  fig, axes = plt.subplots(count, 4, figsize=(8, 2.1 * count), squeeze=False)
  low = min(float(moving.min()), float(fixed.min()))
  high = max(float(moving.max()), float(fixed.max()))
  for i in range(count):
    for ax, image, name in zip(
      axes[i], (moving[i], fixed[i], warped[i]), ("moving", "fixed", "warped")
    ):
      ax.imshow(image, cmap="gray", vmin=low, vmax=high)
      ax.set_title(name if i == 0 else "", fontsize=9)
    axes[i, 3].imshow(moving[i], cmap="gray", vmin=low, vmax=high, alpha=0.5)
    plot_deformed_grid(axes[i, 3], displacement[i])
    if i == 0:
      axes[i, 3].set_title("deformed grid", fontsize=9)
    if titles is not None:
      axes[i, 0].set_ylabel(titles[i], fontsize=8)
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  save_png(fig, path, dpi=100)
  plt.close(fig)


def _as_stack(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim == 2:
    images = images[None]
  if images.ndim != 3:
    raise ValueError(f"images must be [N, H, W] or [N, H, W, 1], got {images.shape}")
  return images
