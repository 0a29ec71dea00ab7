"""Segmentation metrics (mammojax/metrics/segmentation.py) against MONAI's DiceMetric and
compute_hausdorff_distance, by hand, and against scipy's Wilcoxon test."""

import warnings

import numpy as np
import pytest
from scipy import ndimage, stats

from mammojax.metrics import segmentation as seg

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")


def _blobs(shape, seed, count=3, threshold=0.6):
  """A random binary mask of smooth blobs ``[*S]``."""
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
  mask = field > np.quantile(field, threshold)
  labelled, n = ndimage.label(mask)
  keep = rng.permutation(np.arange(1, n + 1))[:count]
  return np.isin(labelled, keep)


def _labels(shape, seed, num_classes):
  """A label map ``[*S]`` with class k painted by random blobs, later classes on top."""
  out = np.zeros(shape, np.int64)
  for k in range(1, num_classes):
    out[_blobs(shape, seed * 10 + k, threshold=0.7)] = k
  return out


def _monai_dice(pred, true, num_classes, include_background):
  metric = monai.metrics.DiceMetric(
    include_background=include_background, reduction="none", num_classes=num_classes
  )
  return metric(torch.from_numpy(pred[:, None]), torch.from_numpy(true[:, None])).numpy()


@pytest.mark.parametrize("include_background", [True, False])
def test_dice_per_subject_matches_monai_with_an_empty_class(include_background):
  shape, num_classes = (12, 14, 10), 4
  pred = np.stack([_labels(shape, s, num_classes) for s in (1, 2, 3)])
  true = np.stack([_labels(shape, s, num_classes) for s in (4, 5, 6)])
  true[1][true[1] == 2] = 0  # class 2 absent from subject 1's ground truth, present in pred
  true[2][true[2] == 3] = 0
  pred[2][pred[2] == 3] = 0  # class 3 absent from both in subject 2
  assert (pred[1] == 2).any()
  ours = seg.dice_per_subject(pred, true, num_classes, include_background)
  theirs = _monai_dice(pred, true, num_classes, include_background)
  assert ours.shape == theirs.shape == (3, num_classes - (not include_background))
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
  offset = 0 if include_background else 1
  assert np.isnan(ours[1, 2 - offset]) and np.isnan(ours[2, 3 - offset])
  assert np.nanmax(np.abs(ours - theirs)) <= 1e-6
  np.testing.assert_allclose(
    seg.dice_per_class(pred[0], true[0], num_classes, include_background), ours[0]
  )


def test_dice_ignore_empty_false_matches_monai():
  pred = np.array([[0, 1, 1], [0, 0, 0]])
  true = np.array([[0, 1, 0], [0, 0, 0]])
  ours = seg.dice_per_class(pred, true, 3, ignore_empty=False)
  theirs = monai.metrics.compute_dice(
    torch.from_numpy(pred[None, None]),
    torch.from_numpy(true[None, None]),
    ignore_empty=False,
    num_classes=3,
  ).numpy()[0]
  np.testing.assert_allclose(ours, theirs, atol=1e-7)
  # Background 2*4/(5+4), class 1 2*1/(2+1), class 2 empty in both -> 1.
  np.testing.assert_allclose(ours, [8 / 9, 2 / 3, 1.0])
  assert np.isnan(seg.dice_per_class(pred, true, 3)[2])


def _monai_hd95(pred, true, spacing, percentile=95):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # MONAI warns on empty masks
    return float(
      monai.metrics.compute_hausdorff_distance(
        torch.from_numpy(pred[None, None].astype(np.float32)),
        torch.from_numpy(true[None, None].astype(np.float32)),
        include_background=True,
        percentile=percentile,
        spacing=spacing,
      )[0, 0]
    )


@pytest.mark.parametrize("spacing", [None, (1.5, 0.8, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hausdorff95_matches_monai_on_random_blobs(seed, spacing):
  shape = (16, 18, 14)
  pred, true = _blobs(shape, seed), _blobs(shape, seed + 100)
  ours = seg.hausdorff95(pred, true, spacing=spacing)
  theirs = _monai_hd95(pred, true, spacing)
  assert np.isfinite(ours) and ours > 0
  assert abs(ours - theirs) <= 1e-5 * max(1.0, theirs)


def test_hausdorff_2d_touching_the_border_and_empty_conventions():
  pred, true = _blobs((20, 20), 7, threshold=0.3), _blobs((20, 20), 8, threshold=0.3)
  assert pred[0].any() or pred[:, 0].any()  # edges on the array border count as surface
  assert abs(seg.hausdorff95(pred, true, spacing=0.5) - _monai_hd95(pred, true, 0.5)) <= 1e-5
  full = seg.hausdorff95(pred, true, percentile=None)
  assert abs(full - _monai_hd95(pred, true, None, percentile=None)) <= 1e-5
  assert full >= seg.hausdorff95(pred, true)
  empty = np.zeros_like(pred)
  assert seg.hausdorff95(pred, pred) == 0.0
  for a, b in ((empty, empty), (pred, empty), (empty, true)):
    # MONAI: NaN with a percentile whenever a mask is empty (inf - inf in torch.quantile).
    assert np.isnan(seg.hausdorff95(a, b)) and np.isnan(_monai_hd95(a, b, None))
  for a, b in ((pred, empty), (empty, true)):
    assert seg.hausdorff95(a, b, percentile=None) == np.inf
    assert _monai_hd95(a, b, None, percentile=None) == np.inf
  assert np.isnan(seg.hausdorff95(empty, empty, percentile=None))


def test_volume_difference_on_a_known_cube():
  true = np.zeros((20, 20, 20), bool)
  true[5:15, 5:15, 5:15] = True  # 1000 voxels
  pred = np.zeros_like(true)
  pred[5:15, 5:15, 5:17] = True  # 1200 voxels
  difference, relative = seg.volume_difference(pred, true, spacing=(0.5, 0.5, 2.0))
  # 0.5 mm3 per voxel: 600 - 500 mm3 = 0.1 ml, relative 0.2.
  assert difference == pytest.approx(0.1) and relative == pytest.approx(0.2)
  difference, relative = seg.volume_difference(true, pred, spacing=1.0)
  assert difference == pytest.approx(-0.2) and relative == pytest.approx(-0.2 / 1.2)
  assert np.isnan(seg.volume_difference(pred, np.zeros_like(pred), 1.0)[1])


def test_summarize_dice_counts_skipped_subjects():
  scores = np.array([[0.9, 0.5, np.nan], [0.7, np.nan, np.nan], [0.8, 0.1, np.nan]])
  summary = seg.summarize_dice(scores, ["bg", "tumour", "node"])
  assert summary["n_subjects"] == 3
  assert summary["classes"]["bg"] == pytest.approx(
    {"mean": 0.8, "std": np.std([0.9, 0.7, 0.8]), "median": 0.8, "n_valid": 3, "n_skipped": 0}
  )
  assert summary["classes"]["tumour"]["mean"] == pytest.approx(0.3)
  assert summary["classes"]["tumour"]["n_skipped"] == 1
  node = summary["classes"]["node"]
  assert np.isnan(node["mean"]) and node["n_valid"] == 0 and node["n_skipped"] == 3
  theirs, _ = monai.metrics.utils.do_metric_reduction(torch.tensor(scores), "mean")
  assert summary["mean"] == pytest.approx(float(theirs)) == pytest.approx((0.7 + 0.7 + 0.45) / 3)


def test_wilcoxon_matches_scipy_and_drops_nan_pairs():
  a = np.array([0.81, 0.74, 0.90, 0.66, 0.78, 0.85, 0.70, np.nan, 0.88])
  b = np.array([0.79, 0.70, 0.84, 0.67, 0.71, 0.80, 0.69, 0.75, 0.83])
  result = seg.wilcoxon_paired(a, b)
  expected = stats.wilcoxon(np.delete(a, 7), np.delete(b, 7))
  assert result["n_pairs"] == 8 and result["n_dropped_nan"] == 1
  assert result["statistic"] == pytest.approx(expected.statistic)
  assert result["p_value"] == pytest.approx(expected.pvalue)
  # Differences 0.02, 0.04, 0.06, -0.01, 0.07, 0.05, 0.01, 0.05: one negative of rank 1.5.
  assert result["statistic"] == pytest.approx(1.5)
  assert result["median_difference"] == pytest.approx(0.045)
  assert result["mean_difference"] == pytest.approx(np.mean(np.delete(a - b, 7)))
  same = seg.wilcoxon_paired([0.5, 0.6], [0.5, 0.6])
  assert same["p_value"] == 1.0 and same["n_pairs"] == 2
  assert np.isnan(seg.wilcoxon_paired([np.nan], [0.3])["p_value"])


def test_bad_inputs_raise_clear_errors():
  mask = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match="NaN"):
    seg.hausdorff95(np.full((4, 4), np.nan), mask)
  with pytest.raises(ValueError, match="binary"):
    seg.volume_difference(np.full((4, 4), 2), mask, 1.0)
  with pytest.raises(ValueError, match="must match"):
    seg.hausdorff95(mask, np.zeros((4, 5), bool))
  with pytest.raises(ValueError, match="percentile"):
    seg.hausdorff95(mask, mask, percentile=0)
  with pytest.raises(ValueError, match="spacing"):
    seg.hausdorff95(mask, mask, spacing=(1.0, 2.0, 3.0))
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    seg.dice_per_class(np.full((4, 4), 3), np.zeros((4, 4), int), 3)
  with pytest.raises(ValueError, match="NaN"):
    seg.dice_per_class(np.full((4, 4), np.nan), np.zeros((4, 4)), 3)
  with pytest.raises(ValueError, match="same length"):
    seg.wilcoxon_paired([0.1, 0.2], [0.1])
  with pytest.raises(ValueError, match="class_names"):
    seg.summarize_dice(np.zeros((2, 3)), ["a", "b"])
