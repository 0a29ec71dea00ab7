"""What ``python -m mammojax.explain`` writes for one example, and the scores of its maps.

One directory per example: each method's map as ``<method>.npy`` at the input's resolution
(GradCAM ``[H, W]``, pixel attributions ``[H, W, C]``; a sequence's maps carry the visit axis
first: ``[V, H, W]`` / ``[V, H, W, C]``, real visits only, oldest first; an image pair's, such
as ImgFeatAlign's, the axis (prior, current)), ``methods.png`` (the sample beside every method's
map, like the table of the Temporal-GradCam paper) and, for sequences, ``visits.png`` (every
visit with its maps and its share of the prediction), for pairs ``pair.png`` (both images, the
warped prior, the maps of both, and the prediction's split between them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mammojax.atomic_files import write_npy_atomic
from mammojax.interpret.scoring import pointing_game, positive_fraction_inside, summarize
from mammojax.viz.attribution import save_method_grid, save_pair_figure, save_visit_figure

SCORES = ("pointing_game", "positive_fraction_inside")
# The chance level of both scores (a map that points at random, or spreads its mass evenly)
# is the region's share of the image, reported beside the methods under this name.
REGION = "region"


def display_plane(image: np.ndarray) -> np.ndarray:
  """A model input ``[H, W, C]`` as one displayable plane ``[H, W]`` (the channel mean)."""
  image = np.asarray(image, np.float32)
  return image.mean(axis=-1) if image.ndim == 3 else image


def score_maps(
  maps: Mapping[str, np.ndarray], regions: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
  """``{method: {score: [B]}}`` of maps ``[B, H, W(, C)]`` against ``regions`` ``[B, H, W]``
  (NaN where a map or region cannot be scored: see :mod:`mammojax.interpret.scoring`), and
  under :data:`REGION` the regions' share of the image (``area_fraction``), the chance level
  of both scores.

  The pointing game counts a hit when any pixel of the maximum lies in the region: a GradCAM
  map upsampled with ``'nearest'`` has a whole block of equal maxima (32 x 32 pixels for a
  ResNet's ``layer4``), and that block touching the region is the most its resolution can say.
  """
  regions = np.asarray(regions).astype(bool)
  scores = {
    name: {
      "pointing_game": pointing_game(values, regions, ties="any"),
      "positive_fraction_inside": positive_fraction_inside(values, regions),
    }
    for name, values in maps.items()
  }
  area = regions.reshape(regions.shape[0], -1).mean(axis=1)
  scores[REGION] = {"area_fraction": np.where(area > 0, area, np.nan)}
  return scores


def score_per_image(
  maps: Mapping[str, np.ndarray], regions: np.ndarray, names: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
  """:func:`score_maps` of one example's images scored apart: maps ``[V, H, W(, C)]`` against
  regions ``[V, H, W]``, keyed ``'<image>/<method>'`` (``'current/gradcam'``) and
  ``'<image>/region'``, each score ``[1]``."""
  if len(names) != len(regions):
    raise ValueError(f"{len(regions)} regions for the images {list(names)}")
  return {
    f"{image}/{name}": {score: values[i : i + 1] for score, values in scores.items()}
    for name, scores in score_maps(maps, regions).items()
    for i, image in enumerate(names)
  }


def write_image_example(
  directory: str,
  image: np.ndarray,
  maps: Mapping[str, np.ndarray],
  title: str,
) -> None:
  """One image's outputs: ``maps[method]`` is ``[H, W]`` or ``[H, W, C]``."""
  os.makedirs(directory, exist_ok=True)
  for name, values in maps.items():
    write_npy_atomic(os.path.join(directory, f"{name}.npy"), values)
  save_method_grid(os.path.join(directory, "methods.png"), display_plane(image), maps, title=title)


def write_sequence_example(
  directory: str,
  images: np.ndarray,
  maps: Mapping[str, np.ndarray],
  visit_labels: Sequence[str],
  visit_scores: np.ndarray | None,
  title: str,
) -> None:
  """One sequence's outputs: ``images`` ``[V, H, W, C]`` and ``maps[method]`` ``[V, ...]`` of
  its real visits, oldest first; ``visit_scores`` ``[V]`` (e.g. per-visit integrated
  gradients) drawn under them."""
  os.makedirs(directory, exist_ok=True)
  for name, values in maps.items():
    write_npy_atomic(os.path.join(directory, f"{name}.npy"), values)
  planes = [display_plane(image) for image in images]
  save_visit_figure(
    os.path.join(directory, "visits.png"),
    planes,
    {name: list(values) for name, values in maps.items()},
    visit_labels=visit_labels,
    visit_scores=None if visit_scores is None else list(map(float, visit_scores)),
    title=title,
  )
  current = {name: values[-1] for name, values in maps.items()}
  save_method_grid(
    os.path.join(directory, "methods.png"), planes[-1], current, title=f"{title} (current)"
  )


def write_pair_example(
  directory: str,
  images: np.ndarray,
  warped_prior: np.ndarray | None,
  maps: Mapping[str, np.ndarray],
  shares: Mapping[str, float],
  title: str,
) -> None:
  """One image pair's outputs: ``images`` ``[2, H, W, C]`` and ``maps[method]`` ``[2, ...]``
  (prior, current), the prior warped onto the current image ``[H, W, C]`` (None without
  alignment), and the prediction's ``shares`` (e.g. current, prior, alignment) drawn as bars."""
  os.makedirs(directory, exist_ok=True)
  for name, values in maps.items():
    write_npy_atomic(os.path.join(directory, f"{name}.npy"), values)
  prior, current = (display_plane(image) for image in images)
  save_pair_figure(
    os.path.join(directory, "pair.png"),
    current,
    prior,
    {name: (values[1], values[0]) for name, values in maps.items()},
    warped_prior=None if warped_prior is None else display_plane(warped_prior),
    shares=shares,
    title=title,
  )


def visit_labels(time_offsets: np.ndarray) -> list[str]:
  """Column titles of real visits, oldest first: ``'t-2.5 y'`` ... ``'current'``."""
  return ["current" if float(t) == 0.0 else f"t-{float(t):.1f} y" for t in time_offsets]


def summarize_scores(collected: Mapping[str, Mapping[str, list[np.ndarray]]]) -> dict[str, Any]:
  """``{method: {score: {mean, count, unscorable}}}`` over every example (JSON-ready)."""
  return {
    name: summarize({score: np.concatenate(parts) for score, parts in scores.items()})
    for name, scores in collected.items()
  }
