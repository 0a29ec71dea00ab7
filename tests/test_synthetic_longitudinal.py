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
