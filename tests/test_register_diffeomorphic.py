"""Instance registration with its defaults brings a smooth deformation of a brain-like slice back
without folds; the scaling-and-squaring exponential against the matrix exponential."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg, ndimage

from mammojax.data.synthetic.brain_sequences import SyntheticBrainSpec, generate_patient
from mammojax.models.registration import instance
from mammojax.models.registration.inputs import RegistrationInputError
from mammojax.nn import warp as warp_lib

SIZE = 128


@pytest.fixture(scope="module")
def deformed_brain():
  """``(fixed, moving, true displacement [H, W, 2], brain mask)``: a synthetic brain slice
  (skull, grey/white texture, ventricles) as ``moving`` and ``fixed(x) = moving(x + u(x))``
  under a smooth random field of up to 4 px whose own Jacobian is positive (min 0.70)."""
  record = generate_patient(SyntheticBrainSpec(image_size=(SIZE, SIZE)), 3)[-1]
  moving = np.asarray(record["images"][-1], np.float32)
  moving = (moving - moving.min()) / (moving.max() - moving.min())
  rng = np.random.default_rng(0)
  field = np.stack(
    [
      ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), SIZE / 10, mode="wrap")
      for _ in range(2)
    ],
    -1,
  )
  truth = (field * 4.0 / np.abs(field).max()).astype(np.float32)
  assert float(warp_lib.jacobian_determinant(jnp.asarray(truth)[None]).min()) > 0.5
  fixed = warp_lib.warp(jnp.asarray(moving)[None, ..., None], jnp.asarray(truth)[None])
  return np.asarray(fixed[0, ..., 0]), moving, truth, moving > 0.1


def _endpoint_error(result, truth, mask):
  return np.linalg.norm(result["displacement"] - truth, axis=-1)[mask]


def test_defaults_recover_a_smooth_deformation_without_folds(deformed_brain):
  fixed, moving, truth, brain = deformed_brain
  result = instance.register(fixed, moving, progress=False)
  assert result["folds"] == 0
  assert result["min_jacobian"] > 0.2
  error = _endpoint_error(result, truth, brain)
  assert error.mean() < 0.3, error.mean()
  assert result["similarity_after"] < 0.6 * result["similarity_before"]


def test_direct_displacement_at_full_size_folds_on_the_same_pair(deformed_brain):
  """Why the defaults changed: the former defaults (one level, u optimised directly) fold here
  and are less accurate."""
  fixed, moving, truth, brain = deformed_brain
  result = instance.register(fixed, moving, transform="displacement", levels=1, progress=False)
  assert result["folds"] > 0 and result["min_jacobian"] < 0
  assert _endpoint_error(result, truth, brain).mean() > 0.4


def test_exponential_of_a_linear_field_is_the_matrix_exponential():
  """``v(x) = A (x - c)`` has the flow ``phi(x) = c + expm(A) (x - c)``; scaling and squaring
  matches it away from the border (where the sampled field is clamped)."""
  a = np.array([[0.03, -0.12], [0.09, -0.02]])
  shape = (64, 64)
  centre = np.array([31.5, 31.5])
  grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
  velocity = (grid - centre) @ a.T
  displacement = instance.exponential(jnp.asarray(velocity, jnp.float32)[None], 7)[0]
  expected = (grid - centre) @ (linalg.expm(a) - np.eye(2)).T
  inner = (slice(16, 48), slice(16, 48))
  np.testing.assert_allclose(np.asarray(displacement)[inner], expected[inner], atol=0.02)


def test_exponential_of_a_constant_field_is_that_translation():
  velocity = jnp.broadcast_to(jnp.asarray([1.5, -2.25]), (1, 20, 24, 2))
  np.testing.assert_allclose(instance.exponential(velocity, 6), velocity, atol=1e-5)


def test_levels_halve_down_to_the_smallest_side():
  assert instance.level_shapes((128, 100), 3) == [(32, 25), (64, 50), (128, 100)]
  assert instance.level_shapes((20, 40), 4) == [(10, 20), (20, 40)]
  assert instance.level_shapes((5, 5), 3) == [(5, 5)]


def test_refining_a_starting_field_composes_with_it(deformed_brain):
  """Started from the true field, the refinement stays near it (the optimised part is near
  the identity) and reports the composed field."""
  fixed, moving, truth, brain = deformed_brain
  result = instance.register(
    fixed, moving, steps=20, levels=1, initial_displacement=truth, progress=False
  )
  assert _endpoint_error(result, truth, brain).mean() < 0.15
  assert result["folds"] == 0


@pytest.mark.parametrize(
  ("options", "message"),
  [({"levels": 0}, "--levels=0"), ({"squaring_steps": -1}, "--squaring_steps=-1")],
)
def test_bad_schedule_is_refused(options, message):
  image = np.random.default_rng(0).random((12, 12)).astype(np.float32)
  with pytest.raises(RegistrationInputError, match=message):
    instance.register(image, image, steps=1, progress=False, **options)
