"""The masked-autoencoder reconstruction figure: rows for the acquired contrasts only, the masked
input and MAE composite drawn, one window per row, errors, the PNG written atomically."""

import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from mammojax.viz import reconstruction as rec_viz  # noqa: E402

H, W, K = 16, 12, 3
NAMES = ("T1", "T2", "DWI")
PRESENT = np.array([True, False, True])


def _inputs():
  rng = np.random.default_rng(0)
  original = rng.uniform(0.0, 1.0, (H, W, K)).astype(np.float32)
  original[..., 2] *= 100.0  # another intensity scale: its row gets its own window
  masked = np.zeros((H, W, K), bool)
  masked[:8, :4] = True  # one 8x4 masked patch in every slot
  reconstruction = original + 0.5 * original.std(axis=(0, 1))
  return original, masked, reconstruction


def test_masked_input_and_composite():
  original = np.arange(4.0).reshape(2, 2)
  masked = np.array([[1, 0], [0, 1]], np.uint8)
  out = rec_viz.masked_input(original, masked)
  assert np.isnan(out[0, 0]) and np.isnan(out[1, 1])
  np.testing.assert_array_equal(out[[0, 1], [1, 0]], [1.0, 2.0])
  np.testing.assert_array_equal(
    rec_viz.masked_input(original, masked, fill=-1.0), [[-1, 1], [2, -1]]
  )
  np.testing.assert_array_equal(
    rec_viz.mae_composite(original, masked, original + 10.0), [[10.0, 1.0], [2.0, 13.0]]
  )
  assert rec_viz.intensity_window(np.full((3, 3), 5.0)) == (5.0, pytest.approx(5.0 + 1e-6))


def test_absent_slots_are_skipped():
  assert rec_viz.reconstruction_rows(PRESENT, NAMES) == [(0, "T1"), (2, "DWI")]
  assert rec_viz.reconstruction_rows(np.array([0, 1, 1]), NAMES) == [(1, "T2"), (2, "DWI")]


def test_figure_draws_present_rows_with_one_window_each():
  original, masked, reconstruction = _inputs()
  figure = rec_viz.reconstruction_figure(original, masked, reconstruction, PRESENT, NAMES, "case 7")
  assert len(figure.axes) == 2 * 3
  assert [ax.get_ylabel() for ax in figure.axes[::3]] == ["T1", "DWI"]
  assert [ax.get_title() for ax in figure.axes[:3]] == list(rec_viz.COLUMN_TITLES)
  for row, slot in enumerate((0, 2)):
    axes = figure.axes[3 * row : 3 * row + 3]
    shown = [ax.images[0].get_array() for ax in axes]
    windows = {ax.images[0].get_clim() for ax in axes}
    assert len(windows) == 1
    assert windows.pop() == pytest.approx(np.percentile(original[..., slot], [1, 99]))
    assert not any(ax.get_xticks().size or ax.get_yticks().size for ax in axes)
    np.testing.assert_allclose(shown[0], original[..., slot])
    # Masked input: exactly the masked voxels hidden (drawn in the mask colour), the rest kept.
    np.testing.assert_array_equal(np.ma.getmaskarray(shown[1]), masked[..., slot])
    np.testing.assert_allclose(shown[1].compressed(), original[..., slot][~masked[..., slot]])
    # Reconstruction: predicted voxels in the masked patch, the original elsewhere.
    expected = np.where(masked[..., slot], reconstruction[..., slot], original[..., slot])
    np.testing.assert_allclose(shown[2], expected, rtol=1e-6)


def test_png_is_written_atomically_and_its_height_follows_the_rows(tmp_path):
  from matplotlib.image import imread

  original, masked, reconstruction = _inputs()
  two = tmp_path / "figs" / "two.png"
  three = tmp_path / "figs" / "three.png"
  assert rec_viz.save_reconstruction_figure(
    str(two), original, masked, reconstruction, PRESENT, NAMES
  ) == str(two)
  rec_viz.save_reconstruction_figure(
    str(three), original, masked, reconstruction, np.ones(K), NAMES
  )
  assert sorted(os.listdir(tmp_path / "figs")) == ["three.png", "two.png"]  # no temporary left
  assert two.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  small, big = imread(two), imread(three)
  assert small.ndim == 3 and small.shape[1] == big.shape[1]
  # Height = rows * panel * H / W + 0.7 inches of titles, at 100 dpi.
  panel = 2.2 * H / W
  assert abs(small.shape[0] - 100 * (2 * panel + 0.7)) <= 1
  assert abs(big.shape[0] - 100 * (3 * panel + 0.7)) <= 1


@pytest.mark.parametrize(
  "change, word",
  [
    (lambda o, m, r, p, n: (o[..., 0], m, r, p, n), "original"),
    (lambda o, m, r, p, n: (o, m[:, :-1], r, p, n), "masked"),
    (lambda o, m, r, p, n: (o, m, r[..., :2], p, n), "reconstruction"),
    (lambda o, m, r, p, n: (o, m, r, p[:2], n), "present"),
    (lambda o, m, r, p, n: (o, m, r, p, n[:2]), "contrast_names"),
    (lambda o, m, r, p, n: (o, m, r, np.zeros(K, bool), n), "present marks no contrast"),
  ],
)
def test_errors_name_the_argument(tmp_path, change, word):
  args = change(*_inputs(), PRESENT, NAMES)
  path = tmp_path / "bad.png"
  with pytest.raises(ValueError, match=word):
    rec_viz.save_reconstruction_figure(str(path), *args)
  assert not os.listdir(tmp_path)
