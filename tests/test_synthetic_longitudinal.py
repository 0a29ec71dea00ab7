"""The synthetic current/prior generator: its ground-truth displacement follows the documented
convention (prior(x + u(x)) lines up with current(x)), which the endpoint error of the
MammoRegNet task relies on."""

import numpy as np
from scipy import ndimage

from mammojax.data.synthetic.longitudinal import SyntheticLongitudinalSpec, generate_example


def _misalignment(current, prior, displacement, inside):
  grid = np.stack(np.meshgrid(*[np.arange(n) for n in current.shape], indexing="ij"))
  warped = ndimage.map_coordinates(prior, grid + displacement.transpose(2, 0, 1), order=1)
  return np.abs(warped - current)[inside].mean()


def test_ground_truth_displacement_aligns_prior_to_current():
  spec = SyntheticLongitudinalSpec(
    image_size=(96, 72), store_displacement=True, deformation_pixels=4.0, positive_fraction=0.0
  )
  for index in range(4):
    example = generate_example(spec, "train", index)
    current = example["current_image"].astype(np.float64)
    prior = example["previous_image"].astype(np.float64)
    # The prior has its own gain and offset: compare after matching them inside the breast.
    inside = ndimage.binary_erosion((current > 0) & (prior > 0), iterations=6)
    prior = (prior - prior[inside].mean()) / prior[inside].std() * current[inside].std()
    prior += current[inside].mean()
    u = example["displacement"].astype(np.float64)
    assert u.shape == (96, 72, 2) and np.abs(u).max() > 1.0
    aligned = _misalignment(current, prior, u, inside)
    assert aligned < 0.6 * _misalignment(current, prior, np.zeros_like(u), inside), index
    # The opposite sign (or swapped components) is the mistake this guards against.
    assert aligned < 0.6 * _misalignment(current, prior, -u, inside), index
    assert aligned < 0.8 * _misalignment(current, prior, u[..., ::-1], inside), index


def test_lesion_boxes_mark_the_lesion_in_both_frames():
  spec = SyntheticLongitudinalSpec(image_size=(96, 72), store_displacement=True)
  positives = 0
  for index in range(12):
    example = generate_example(spec, "train", index)
    box, prior_box = example["lesion_boxes"][0], example["prior_lesion_boxes"][0]
    if example["years_to_cancer"] >= spec.num_years:  # no lesion: boxes covering nothing
      assert not box.any() and not prior_box.any()
      continue
    positives += 1
    x0, y0, x1, y1 = box.astype(int)
    assert 0 <= x0 < x1 <= 72 and 0 <= y0 < y1 <= 96
    # The new or grown lesion is what changed: the current image gained intensity in its box.
    current = example["current_image"].astype(np.float64)
    grid = np.stack(np.meshgrid(np.arange(96), np.arange(72), indexing="ij"))
    u = example["displacement"].astype(np.float64).transpose(2, 0, 1)
    aligned = ndimage.map_coordinates(example["previous_image"].astype(np.float64), grid + u)
    change = current - aligned
    inside = np.zeros(current.shape, bool)
    inside[y0:y1, x0:x1] = True
    assert change[inside].mean() > change[~inside & (current > 0)].mean() + 2000, index
    # The prior's box is the same place seen through the deformation: prior(x + u(x)) ~ current.
    center = np.asarray([(y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2])
    moved = center + example["displacement"][int(round(center[0])), int(round(center[1]))]
    px0, py0, px1, py1 = prior_box
    np.testing.assert_allclose(moved, [(py0 + py1 - 1) / 2, (px0 + px1 - 1) / 2], atol=2.0)
  assert positives >= 2
