"""Attribution pictures: normalisation against hand-computed values, colour, overlay, figures."""

import warnings

import numpy as np
import pytest

from mammojax.viz import attribution as attr_viz

# ---------------------------------------------------------------------------------------------
# Normalisation (numpy only).


def test_cumulative_sum_threshold_is_the_mass_share_not_the_pixel_percentile():
  values = np.array([[0.0, 1.0], [2.0, 7.0]])  # sorted 0, 1, 2, 7; running sums 0, 1, 3, 10
  # 30 % of the mass (3) is first reached at the value 2; np.percentile(values, 30) is 0.9.
  assert attr_viz.cumulative_sum_threshold(values, 30.0) == 2.0
  assert np.percentile(values, 30.0) != pytest.approx(2.0)
  # 98 % (9.8) and 60 % (6) are only reached by the last value.
  assert attr_viz.cumulative_sum_threshold(values, 98.0) == 7.0
  assert attr_viz.cumulative_sum_threshold(values, 60.0) == 7.0
  assert attr_viz.cumulative_sum_threshold(values, 10.0) == 1.0
  assert attr_viz.cumulative_sum_threshold(np.zeros((3, 3)), 98.0) == 0.0


def test_normalize_scales_by_the_threshold_and_clips():
  values = np.array([[0.0, 1.0], [2.0, 7.0]])
  np.testing.assert_allclose(
    attr_viz.normalize_attribution(values), [[0.0, 1 / 7], [2 / 7, 1.0]], rtol=1e-6
  )
  # outlier_percentile=70 keeps 30 % of the mass: scale 2, so 7 saturates.
  np.testing.assert_allclose(
    attr_viz.normalize_attribution(values, outlier_percentile=70.0),
    [[0.0, 0.5], [1.0, 1.0]],
    rtol=1e-6,
  )


SIGNED = np.array([[-4.0, 1.0], [2.0, -1.0]])


@pytest.mark.parametrize(
  "sign, percentile, expected",
  [
    ("absolute", 0.0, [[1.0, 0.25], [0.5, 0.25]]),
    ("positive", 0.0, [[0.0, 0.5], [1.0, 0.0]]),
    # Negative keeps only the negative part, reported as a positive magnitude.
    ("negative", 0.0, [[1.0, 0.0], [0.0, 0.25]]),
    ("all", 0.0, [[-1.0, 0.25], [0.5, -0.25]]),
    # Sorted magnitudes 1, 1, 2, 4 (sums 1, 2, 4, 8): half the mass at 2; -4 clips to -1.
    ("all", 50.0, [[-1.0, 0.5], [1.0, -0.5]]),
  ],
)
def test_normalize_signs(sign, percentile, expected):
  result = attr_viz.normalize_attribution(SIGNED, sign=sign, outlier_percentile=percentile)
  assert result.shape == (2, 2)
  assert result.dtype == np.float32
  np.testing.assert_allclose(result, expected, rtol=1e-6)


@pytest.mark.parametrize("sign", attr_viz.SIGNS)
def test_all_zero_map_gives_zeros_without_warnings(sign):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = attr_viz.normalize_attribution(np.zeros((3, 4, 2)), sign=sign)
  np.testing.assert_array_equal(result, np.zeros((3, 4)))


def test_missing_sign_gives_zeros_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = attr_viz.normalize_attribution(np.abs(SIGNED), sign="negative")
  np.testing.assert_array_equal(result, np.zeros((2, 2)))


def test_channels_are_summed_before_the_sign():
  # Channel sums: [[0, 3], [-2, 1]]; the abs of the sum, not the sum of abs ([[2, 3], [2, 1]]).
  pixels = np.array([[[1.0, -1.0], [1.0, 2.0]], [[-1.0, -1.0], [0.5, 0.5]]])
  np.testing.assert_allclose(
    attr_viz.normalize_attribution(pixels, outlier_percentile=0.0),
    [[0.0, 1.0], [2 / 3, 1 / 3]],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    attr_viz.normalize_attribution(pixels, sign="all", outlier_percentile=0.0),
    [[0.0, 1.0], [-2 / 3, 1 / 3]],
    rtol=1e-6,
  )


def test_normalize_errors():
  with pytest.raises(ValueError, match="unknown sign 'abs'.*absolute, positive, negative, all"):
    attr_viz.normalize_attribution(SIGNED, sign="abs")
  with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, C\].*\(4,\)"):
    attr_viz.normalize_attribution(np.ones(4))
  with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, C\].*4 dimensions"):
    attr_viz.normalize_attribution(np.ones((1, 2, 2, 3)))
  with pytest.raises(ValueError, match="outlier_percentile must be in"):
    attr_viz.normalize_attribution(SIGNED, outlier_percentile=101.0)
  with pytest.raises(ValueError, match="NaN or infinite"):
    attr_viz.normalize_attribution(np.array([[1.0, np.nan]]))


# ---------------------------------------------------------------------------------------------
# Colour and overlay (matplotlib colormaps).


def test_colorize_unsigned_matches_the_colormap():
  matplotlib = pytest.importorskip("matplotlib")
  values = np.array([[0.0, 0.25], [0.5, 1.0]])
  rgb = attr_viz.colorize(values)
  assert rgb.shape == (2, 2, 3)
  assert rgb.min() >= 0.0 and rgb.max() <= 1.0
  np.testing.assert_allclose(rgb, matplotlib.colormaps["jet"](values)[..., :3], atol=1e-6)
  assert rgb[0, 0, 2] > rgb[0, 0, 0]  # jet: low is blue
  assert rgb[1, 1, 0] > rgb[1, 1, 2]  # high is red


def test_colorize_signed_centres_zero():
  pytest.importorskip("matplotlib")
  rgb = attr_viz.colorize(np.array([[-1.0, 0.0, 1.0]]))
  blue, white, red = rgb[0]
  assert blue[2] > 0.9 and blue[0] < 0.1
  np.testing.assert_allclose(white, [1.0, 1.0, 1.0], atol=0.02)
  assert red[0] > 0.9 and red[2] < 0.1
  # Explicitly signed: 0 is white even with no negative value present.
  np.testing.assert_allclose(
    attr_viz.colorize(np.zeros((1, 1)), signed=True)[0, 0], white, atol=1e-6
  )
  with pytest.raises(ValueError, match=r"\[H, W\]"):
    attr_viz.colorize(np.zeros((2, 2, 3)))


def test_overlay_blends_the_scaled_image_with_the_colour():
  pytest.importorskip("matplotlib")
  image = np.array([[100.0, 300.0], [500.0, 4100.0]])  # any range: min-max scaled
  heat = np.array([[0.0, 0.5], [1.0, 0.2]])
  grey = (image - 100.0) / 4000.0
  result = attr_viz.overlay(image, heat, alpha=0.3)
  assert result.shape == (2, 2, 3)
  assert result.min() >= 0.0 and result.max() <= 1.0
  expected = 0.7 * grey[..., None] + 0.3 * attr_viz.colorize(heat)
  np.testing.assert_allclose(result, expected, atol=1e-6)
  np.testing.assert_allclose(
    attr_viz.overlay(image, heat, alpha=0.0), np.repeat(grey[..., None], 3, -1), atol=1e-6
  )
  rgb_image = np.stack([image, image * 0, image], axis=-1)
  assert attr_viz.overlay(rgb_image, heat).shape == (2, 2, 3)


def test_overlay_of_a_constant_image_and_errors():
  pytest.importorskip("matplotlib")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = attr_viz.overlay(np.full((3, 3), 7.0), np.zeros((3, 3)), alpha=1.0, signed=True)
  np.testing.assert_allclose(result, np.ones((3, 3, 3)), atol=0.02)  # white: bwr at zero
  with pytest.raises(ValueError, match=r"heat map shape \(2, 2\).*\(3, 3\)"):
    attr_viz.overlay(np.ones((3, 3)), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="alpha must be in"):
    attr_viz.overlay(np.ones((3, 3)), np.zeros((3, 3)), alpha=1.5)
  with pytest.raises(ValueError, match=r"image must be \[H, W\]"):
    attr_viz.overlay(np.ones((3, 3, 2)), np.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# Figures.


def _read_png(path):
  image_module = pytest.importorskip("PIL.Image")
  with image_module.open(path) as png:
    assert png.format == "PNG"
    return np.asarray(png.convert("RGB"))


def _sample(seed=0, size=32):
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size]
  image = np.exp(-((rows - size / 2) ** 2 + (cols - size / 2) ** 2) / (size**2 / 8)) * 1000
  gradcam = np.maximum(0.0, np.sin(rows / 5.0) * np.cos(cols / 7.0))
  pixels = rng.normal(size=(size, size, 3))
  return image, gradcam, pixels


def _assert_not_blank(pixels):
  assert pixels.shape[0] > 50 and pixels.shape[1] > 50
  # A blank figure is one colour; drawn panels give many colours and non-white area.
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
  assert np.mean(np.any(pixels < 250, axis=-1)) > 0.1


def test_method_grid_writes_one_panel_per_method(tmp_path):
  pytest.importorskip("matplotlib")
  image, gradcam, pixels = _sample()
  one = _read_png(
    attr_viz.save_method_grid(tmp_path / "one.png", image, {"GradCAM": gradcam}, title="x")
  )
  three_path = attr_viz.save_method_grid(
    tmp_path / "sub" / "three.png",
    image,
    {"GradCAM": gradcam, "IG": pixels, "Saliency": np.abs(pixels)},
    signs={"IG": "all"},
    title="case 1",
    colorbar=True,
  )
  assert three_path == str(tmp_path / "sub" / "three.png")
  three = _read_png(three_path)
  _assert_not_blank(one)
  _assert_not_blank(three)
  assert three.shape[1] > one.shape[1] * 1.5  # two more panels, side by side
  assert not list(tmp_path.rglob("*.tmp*"))  # the atomic write left no temporary file


def test_method_grid_errors(tmp_path):
  pytest.importorskip("matplotlib")
  image, gradcam, _ = _sample()
  with pytest.raises(ValueError, match=r"signs names methods not in maps: \['Gradcam'\]"):
    attr_viz.save_method_grid(
      tmp_path / "a.png", image, {"GradCAM": gradcam}, signs={"Gradcam": "all"}
    )
  with pytest.raises(ValueError, match="unknown sign 'signed' for 'GradCAM'"):
    attr_viz.save_method_grid(
      tmp_path / "a.png", image, {"GradCAM": gradcam}, signs={"GradCAM": "signed"}
    )
  with pytest.raises(ValueError, match=r"method 'GradCAM': heat map shape \(8, 8\)"):
    attr_viz.save_method_grid(tmp_path / "a.png", image, {"GradCAM": gradcam[:8, :8]})
  assert not (tmp_path / "a.png").exists()


def test_visit_figure_rows_columns_and_scores(tmp_path):
  pytest.importorskip("matplotlib")
  visits = [_sample(seed) for seed in range(3)]
  images = [visit[0] for visit in visits]
  maps = {"GradCAM": [visit[1] for visit in visits], "IG": [visit[2] for visit in visits]}
  labels = ["t-2.0 y", "t-1.0 y", "t"]
  plain = _read_png(
    attr_viz.save_visit_figure(tmp_path / "plain.png", images, maps, visit_labels=labels)
  )
  scored = _read_png(
    attr_viz.save_visit_figure(
      tmp_path / "scored.png",
      images,
      maps,
      visit_labels=labels,
      visit_scores=[0.4, -0.2, 1.1],
      title="patient 7",
      signs={"IG": "all"},
    )
  )
  _assert_not_blank(plain)
  _assert_not_blank(scored)
  assert scored.shape[0] > plain.shape[0]  # the bar chart row
  # Bars: the positive ones red, the negative one blue (tab:red / tab:blue).
  assert np.any(np.all(np.abs(scored.astype(int) - [214, 39, 40]) < 8, axis=-1))
  assert np.any(np.all(np.abs(scored.astype(int) - [31, 119, 180]) < 8, axis=-1))
  single = _read_png(
    attr_viz.save_visit_figure(
      tmp_path / "single.png", images[:1], {"GradCAM": [maps["GradCAM"][0]]}, visit_labels=["t"]
    )
  )
  assert single.shape[1] < plain.shape[1]


def test_visit_maps_share_one_scale_across_visits():
  # The strongest visit sits in the middle, so neither the first nor the last map alone sets it.
  weak, strong, weaker = np.full((4, 4), 1.0), np.full((4, 4), 4.0), np.full((4, 4), 0.5)
  normalised = attr_viz._normalised_maps([weak, strong, weaker], "absolute", 0.0)
  np.testing.assert_allclose(normalised[0], 0.25)
  np.testing.assert_allclose(normalised[1], 1.0)
  np.testing.assert_allclose(normalised[2], 0.125)


def test_visit_figure_count_errors(tmp_path):
  pytest.importorskip("matplotlib")
  images = [_sample(seed)[0] for seed in range(2)]
  maps = {"GradCAM": [_sample(seed)[1] for seed in range(2)]}
  path = tmp_path / "v.png"
  with pytest.raises(ValueError, match="got 2 images but 3 visit labels"):
    attr_viz.save_visit_figure(path, images, maps, visit_labels=["a", "b", "c"])
  with pytest.raises(ValueError, match="method 'GradCAM' has 1 maps for 2 visits"):
    attr_viz.save_visit_figure(path, images, {"GradCAM": maps["GradCAM"][:1]}, visit_labels="ab")
  with pytest.raises(ValueError, match="got 3 visit scores for 2 visits"):
    attr_viz.save_visit_figure(
      path, images, maps, visit_labels=["a", "b"], visit_scores=[1.0, 2.0, 3.0]
    )
  with pytest.raises(ValueError, match="need at least one visit"):
    attr_viz.save_visit_figure(path, [], {}, visit_labels=[])
  assert not path.exists()
