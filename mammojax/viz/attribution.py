"""Pictures of attribution maps: GradCAM maps ``[H, W]`` and pixel attributions ``[H, W, C]``.

Normalisation follows Captum 0.9.0 (``captum/attr/_utils/visualization.py``,
``_normalize_attr``): a map is reduced to ``[H, W]`` by summing its channels, one sign is kept
(or all), and it is divided by a robust maximum, the value at which the cumulative sum of the
sorted magnitudes reaches ``100 - outlier_percentile`` percent of their total, so that a few
extreme pixels do not make the rest of the map black. Values above that scale are clipped.

matplotlib is the optional ``viz`` extra: it is imported inside the functions, and figures are
drawn on an explicit Agg canvas so the process-wide pyplot backend is never touched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mammojax.viz.figures import save_png

SIGNS = ("absolute", "positive", "negative", "all")
UNSIGNED_CMAP = "jet"
SIGNED_CMAP = "bwr"


# ---------------------------------------------------------------------------------------------
# Normalisation.


def normalize_attribution(
  attribution: np.ndarray, *, sign: str = "absolute", outlier_percentile: float = 2.0
) -> np.ndarray:
  """Scales an attribution map to ``[0, 1]`` (``[-1, 1]`` for ``sign="all"``) for display.

  Args:
    attribution: ``[H, W]`` (e.g. GradCAM) or ``[H, W, C]`` (pixel attributions; the channels
      are summed, so opposite-signed channels cancel as they do in the model's input sum).
    sign: "absolute" (magnitude), "positive" (positive part only), "negative" (negative part
      only, reported as a positive magnitude) or "all" (signed).
    outlier_percentile: percent of the total magnitude held by the largest values that are
      saturated to 1 (see ``cumulative_sum_threshold``).

  Returns:
    ``[H, W]`` float32. A map with nothing of the chosen sign returns zeros.
  """
  part = _signed_part(attribution, sign)
  scale = cumulative_sum_threshold(np.abs(part), 100.0 - _check_percentile(outlier_percentile))
  return _scale(part, scale, sign)


def cumulative_sum_threshold(values: np.ndarray, percentile: float) -> float:
  """The smallest sorted value at which the running sum reaches ``percentile`` % of the total.

  This is Captum's ``_cumulative_sum_threshold``, deliberately not ``np.percentile``: the
  threshold is taken on the share of the total attribution mass, not on the pixel count, so a
  map whose mass sits in a few pixels is scaled by those pixels. Zero for an all-zero input.

  Args:
    values: non-negative array, any shape.
    percentile: in ``[0, 100]``.
  """
  values = np.asarray(values, np.float64).ravel()
  if values.size == 0:
    raise ValueError("cannot threshold an empty attribution map")
  if np.any(values < 0):
    raise ValueError("cumulative_sum_threshold needs non-negative values (take abs first)")
  percentile = float(percentile)
  if not 0.0 <= percentile <= 100.0:
    raise ValueError(f"percentile must be in [0, 100], got {percentile}")
  sorted_values = np.sort(values)
  cumulative = np.cumsum(sorted_values)
  # Compare with the last running sum rather than values.sum() so that percentile=100 always
  # finds an index despite rounding.
  index = int(np.argmax(cumulative >= cumulative[-1] * 0.01 * percentile))
  return float(sorted_values[index])


def _signed_part(attribution: np.ndarray, sign: str) -> np.ndarray:
  """``[H, W]`` float64: the channel sum with the chosen sign kept (negative as magnitude)."""
  if sign not in SIGNS:
    raise ValueError(f"unknown sign {sign!r}; expected one of {', '.join(SIGNS)}")
  attribution = np.asarray(attribution, np.float64)
  if attribution.ndim == 3:
    attribution = attribution.sum(axis=-1)
  elif attribution.ndim != 2:
    raise ValueError(
      f"attribution must be [H, W] or [H, W, C], got shape {attribution.shape} "
      f"({attribution.ndim} dimensions)"
    )
  if not np.all(np.isfinite(attribution)):
    raise ValueError("attribution has NaN or infinite values")
  if sign == "absolute":
    return np.abs(attribution)
  if sign == "positive":
    return np.maximum(attribution, 0.0)
  if sign == "negative":
    return np.maximum(-attribution, 0.0)
  return attribution


def _scale(part: np.ndarray, scale: float, sign: str) -> np.ndarray:
  """Divides by ``scale`` and clips; zeros (not a division warning) when ``scale`` is zero."""
  if scale <= 0.0:
    return np.zeros(part.shape, np.float32)
  low = -1.0 if sign == "all" else 0.0
  return np.clip(part / scale, low, 1.0).astype(np.float32)


def _check_percentile(outlier_percentile: float) -> float:
  outlier_percentile = float(outlier_percentile)
  if not 0.0 <= outlier_percentile <= 100.0:
    raise ValueError(f"outlier_percentile must be in [0, 100], got {outlier_percentile}")
  return outlier_percentile


# ---------------------------------------------------------------------------------------------
# Colour.


def colorize(
  values: np.ndarray, *, cmap: str | None = None, signed: bool | None = None
) -> np.ndarray:
  """Maps a normalised ``[H, W]`` map to RGB with a matplotlib colormap.

  Args:
    values: ``[H, W]``, in ``[0, 1]`` (unsigned) or ``[-1, 1]`` (signed); outside is clipped.
    cmap: colormap name; default "jet" for unsigned and "bwr" for signed maps.
    signed: whether ``values`` is signed; default: whether any value is negative. Pass it when
      known, since a signed map that happens to be all positive would otherwise be unsigned.

  Returns:
    ``[H, W, 3]`` float32 in ``[0, 1]``. Signed maps put 0 at the centre of the colormap.
  """
  import matplotlib

  values = np.asarray(values, np.float64)
  if values.ndim != 2:
    raise ValueError(f"values must be [H, W], got shape {values.shape}")
  if signed is None:
    signed = bool(np.any(values < 0))
  if signed:
    unit = (np.clip(values, -1.0, 1.0) + 1.0) / 2.0
  else:
    unit = np.clip(values, 0.0, 1.0)
  colormap = matplotlib.colormaps[cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP)]
  return np.asarray(colormap(unit)[..., :3], np.float32)


def display_image(image: np.ndarray) -> np.ndarray:
  """An image of any range as ``[H, W, 3]`` float32 in ``[0, 1]`` (min-max scaled).

  Args:
    image: ``[H, W]``, ``[H, W, 1]`` (grey) or ``[H, W, 3]`` (RGB). A constant image gives zeros.
  """
  image = np.asarray(image, np.float64)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got shape {image.shape}")
  if not np.all(np.isfinite(image)):
    raise ValueError("image has NaN or infinite values")
  low, high = float(image.min()), float(image.max())
  if high <= low:
    return np.zeros(image.shape, np.float32)
  return ((image - low) / (high - low)).astype(np.float32)


def overlay(
  image: np.ndarray,
  heat: np.ndarray,
  *,
  alpha: float = 0.5,
  cmap: str | None = None,
  signed: bool | None = None,
) -> np.ndarray:
  """Blends a colourised map over an image: ``(1 - alpha) * image + alpha * colour``.

  The blend is uniform (as Captum's blended heat map and usual GradCAM pictures), so the
  image darkens evenly and the colour alone carries the attribution.

  Args:
    image: ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``, any range (min-max scaled for display).
    heat: ``[H, W]`` normalised map (``normalize_attribution``), same ``H, W`` as the image.
    alpha: opacity of the map, in ``[0, 1]``.
    cmap, signed: as in ``colorize``; signed maps use a diverging colormap centred on zero.

  Returns:
    ``[H, W, 3]`` float32 in ``[0, 1]``.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  base = display_image(image)
  heat = np.asarray(heat)
  if heat.shape != base.shape[:2]:
    raise ValueError(
      f"heat map shape {heat.shape} does not match image size {base.shape[:2]}; "
      "resize the map to the image first"
    )
  colour = colorize(heat, cmap=cmap, signed=signed)
  return np.clip((1.0 - alpha) * base + alpha * colour, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Figures.


def save_method_grid(
  path: str | os.PathLike,
  image: np.ndarray,
  maps: Mapping[str, np.ndarray],
  *,
  title: str = "",
  signs: Mapping[str, str] | None = None,
  outlier_percentile: float = 2.0,
  alpha: float = 0.5,
  colorbar: bool = False,
) -> str:
  """One PNG row comparing attribution methods: the sample, then one panel per method.

  Every map, GradCAM ``[H, W]`` or pixel attribution ``[H, W, C]`` alike, is normalised on its
  own (``normalize_attribution``) and blended over the sample, so all panels read the same
  way: colour is relative importance within that method, the anatomy stays visible beneath.

  Args:
    path: PNG file to write (atomically).
    image: ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``, any range.
    maps: method name -> ``[H, W]`` or ``[H, W, C]`` with the image's ``H, W``; panels follow
      the mapping's order.
    title: figure title.
    signs: method name -> sign for ``normalize_attribution``; methods not named use
      "absolute". "all" is drawn with a diverging colormap centred on zero.
    outlier_percentile, alpha: as in ``normalize_attribution`` and ``overlay``.
    colorbar: draw a colour scale under each method panel.

  Returns:
    ``path``.
  """
  signs = _check_signs(signs, maps)
  panels = [
    (name, _normalised_maps([attr], signs[name], outlier_percentile)[0], signs[name])
    for name, attr in maps.items()
  ]
  figure = _new_figure(2.2 * (1 + len(panels)), 2.6 + (0.4 if colorbar else 0.0))
  axes = figure.subplots(1, 1 + len(panels), squeeze=False)[0]
  _draw_rgb(axes[0], display_image(image), "sample")
  for ax, (name, heat, sign) in zip(axes[1:], panels):
    _draw_rgb(ax, _blend(image, heat, sign, alpha, name), name)
    if colorbar:
      _add_colorbar(figure, ax, sign)
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  return save_png(figure, path)


def save_visit_figure(
  path: str | os.PathLike,
  images: Sequence[np.ndarray],
  maps: Mapping[str, Sequence[np.ndarray]],
  *,
  visit_labels: Sequence[str],
  visit_scores: Sequence[float] | None = None,
  title: str = "",
  signs: Mapping[str, str] | None = None,
  outlier_percentile: float = 2.0,
  alpha: float = 0.5,
) -> str:
  """Per-visit attribution of one patient's sequence: one column per visit.

  Row one shows the visits' images, then one row per method with its maps overlaid. A method's
  maps share one scale across the visits (the threshold of ``normalize_attribution`` taken over
  all of them together), so a brighter visit is one the method weighted more, not an artefact
  of normalising each visit alone. Padding visits are simply not passed.

  Args:
    path: PNG file to write (atomically).
    images: ``V`` images, each ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``, any range.
    maps: method name -> ``V`` maps, each ``[H, W]`` or ``[H, W, C]`` matching its image.
    visit_labels: ``V`` column titles (a date, or e.g. "t-2.0 y").
    visit_scores: optional ``V`` per-visit attributions (e.g. integrated gradients summed per
      visit), drawn as a signed bar chart under the columns.
    title: figure title.
    signs, outlier_percentile, alpha: as in ``save_method_grid``.

  Returns:
    ``path``.
  """
  count = len(images)
  if count == 0:
    raise ValueError("need at least one visit")
  if len(visit_labels) != count:
    raise ValueError(f"got {count} images but {len(visit_labels)} visit labels")
  for name, method_maps in maps.items():
    if len(method_maps) != count:
      raise ValueError(f"method {name!r} has {len(method_maps)} maps for {count} visits")
  if visit_scores is not None:
    visit_scores = np.asarray(visit_scores, np.float64).ravel()
    if visit_scores.size != count:
      raise ValueError(f"got {visit_scores.size} visit scores for {count} visits")
  signs = _check_signs(signs, maps)
  rows = [
    (name, _normalised_maps(method_maps, signs[name], outlier_percentile), signs[name])
    for name, method_maps in maps.items()
  ]

  bar_rows = 0 if visit_scores is None else 1
  figure = _new_figure(2.0 * count + 0.6, 2.1 * (1 + len(rows)) + 1.6 * bar_rows + 0.3)
  grid = figure.add_gridspec(
    1 + len(rows) + bar_rows, count, height_ratios=[1.0] * (1 + len(rows)) + [0.7] * bar_rows
  )
  for v in range(count):
    ax = figure.add_subplot(grid[0, v])
    _draw_rgb(ax, display_image(images[v]), visit_labels[v])
    if v == 0:
      ax.set_ylabel("image", fontsize=8)
    for r, (name, heats, sign) in enumerate(rows, start=1):
      ax = figure.add_subplot(grid[r, v])
      _draw_rgb(ax, _blend(images[v], heats[v], sign, alpha, name), "")
      if v == 0:
        ax.set_ylabel(name, fontsize=8)
  if visit_scores is not None:
    _draw_scores(figure.add_subplot(grid[-1, :]), visit_scores, visit_labels)
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  return save_png(figure, path)


def save_pair_figure(
  path: str | os.PathLike,
  current: np.ndarray,
  prior: np.ndarray,
  maps: Mapping[str, tuple[np.ndarray, np.ndarray]],
  *,
  warped_prior: np.ndarray | None = None,
  shares: Mapping[str, float] | None = None,
  title: str = "",
  signs: Mapping[str, str] | None = None,
  outlier_percentile: float = 2.0,
  alpha: float = 0.5,
) -> str:
  """One prediction from a current and a prior image (e.g. ImgFeatAlign's risk).

  Row one shows the current image, the prior and, when given, the prior warped onto the
  current one; then one row per method with its maps of the current and the prior image, on
  one scale (as :func:`save_visit_figure`), and under them, when given, the prediction's
  ``shares`` as signed bars (e.g. the current, prior and alignment features' integrated
  gradients).

  Args:
    path: PNG file to write (atomically).
    current, prior: ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]``, any range.
    maps: method name -> ``(current map, prior map)``, each ``[H, W]`` or ``[H, W, C]``.
    warped_prior: the prior aligned to the current image, or None.
    shares: bar label -> value.
    title, signs, outlier_percentile, alpha: as in ``save_method_grid``.

  Returns:
    ``path``.
  """
  signs = _check_signs(signs, maps)
  rows = [
    (name, _normalised_maps(list(pair), signs[name], outlier_percentile), signs[name])
    for name, pair in maps.items()
  ]
  pictures = [("current", current), ("prior", prior)]
  if warped_prior is not None:
    pictures.append(("warped prior", warped_prior))
  bars = 0 if shares is None else 1
  figure = _new_figure(2.0 * len(pictures) + 0.6, 2.1 * (1 + len(rows)) + 1.6 * bars + 0.3)
  grid = figure.add_gridspec(
    1 + len(rows) + bars, len(pictures), height_ratios=[1.0] * (1 + len(rows)) + [0.7] * bars
  )
  for column, (label, image) in enumerate(pictures):
    _draw_rgb(figure.add_subplot(grid[0, column]), display_image(image), label)
  for r, (name, heats, sign) in enumerate(rows, start=1):
    for column, (image, heat) in enumerate(zip((current, prior), heats)):
      ax = figure.add_subplot(grid[r, column])
      _draw_rgb(ax, _blend(image, heat, sign, alpha, name), "")
      if column == 0:
        ax.set_ylabel(name, fontsize=8)
  if shares is not None:
    values = np.asarray(list(shares.values()), np.float64)
    _draw_scores(figure.add_subplot(grid[-1, :]), values, list(shares), ylabel="logit share")
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  return save_png(figure, path)


def _check_signs(signs: Mapping[str, str] | None, maps: Mapping[str, Any]) -> dict[str, str]:
  """The sign of every method ("absolute" unless named); unknown names are errors (typos)."""
  signs = dict(signs or {})
  unknown = sorted(set(signs) - set(maps))
  if unknown:
    raise ValueError(f"signs names methods not in maps: {unknown}; methods: {list(maps)}")
  for name, sign in signs.items():
    if sign not in SIGNS:
      raise ValueError(f"unknown sign {sign!r} for {name!r}; expected one of {', '.join(SIGNS)}")
  return {name: signs.get(name, "absolute") for name in maps}


def _normalised_maps(
  attributions: Sequence[np.ndarray], sign: str, outlier_percentile: float
) -> list[np.ndarray]:
  """Each map ``[H, W]`` normalised with one threshold taken over all of them together."""
  parts = [_signed_part(attr, sign) for attr in attributions]
  magnitudes = np.concatenate([np.abs(part).ravel() for part in parts])
  scale = cumulative_sum_threshold(magnitudes, 100.0 - _check_percentile(outlier_percentile))
  return [_scale(part, scale, sign) for part in parts]


def _blend(image: np.ndarray, heat: np.ndarray, sign: str, alpha: float, name: str) -> np.ndarray:
  """``overlay`` with the method named in a shape error (figures draw many maps)."""
  try:
    return overlay(image, heat, alpha=alpha, signed=sign == "all")
  except ValueError as error:
    raise ValueError(f"method {name!r}: {error}") from error


def _new_figure(width: float, height: float) -> Any:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(figure)
  return figure


def _draw_rgb(ax: Any, rgb: np.ndarray, title: str) -> None:
  """``[H, W, 3]`` in ``[0, 1]`` with a title and no ticks (the frame stays for a row label)."""
  ax.imshow(rgb, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=8)


def _add_colorbar(figure: Any, ax: Any, sign: str) -> None:
  """The colour scale of a blended panel (the panel itself is RGB, so it has no mappable)."""
  from matplotlib.cm import ScalarMappable
  from matplotlib.colors import Normalize

  signed = sign == "all"
  mappable = ScalarMappable(
    norm=Normalize(-1.0 if signed else 0.0, 1.0),
    cmap=SIGNED_CMAP if signed else UNSIGNED_CMAP,
  )
  bar = figure.colorbar(mappable, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04)
  bar.ax.tick_params(labelsize=6)


def _draw_scores(
  ax: Any, scores: np.ndarray, labels: Sequence[str], ylabel: str = "visit score"
) -> None:
  """Signed bars, one per column (positive red, negative blue, as in "bwr")."""
  positions = np.arange(scores.size)
  colours = ["tab:red" if score >= 0 else "tab:blue" for score in scores]
  ax.bar(positions, scores, color=colours, width=0.6)
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set_xlim(-0.5, scores.size - 0.5)
  ax.set_xticks(positions)
  ax.set_xticklabels(list(labels), fontsize=7)
  ax.tick_params(axis="y", labelsize=7)
  ax.set_ylabel(ylabel, fontsize=8)
