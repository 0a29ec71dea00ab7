"""Registration losses on plain arrays (mammojax/losses/similarity.py, registration.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.losses import mammoregnet as mammoregnet_losses
from mammojax.losses import registration as L
from mammojax.losses import similarity as S
from mammojax.nn import warp as W


def _image(key, shape=(2, 12, 12, 1)):
  return jax.random.uniform(key, shape)


def test_ssd_and_ncc_hand_computed():
  a = jnp.array([0.0, 1.0, 2.0, 3.0]).reshape(1, 2, 2, 1)
  b = jnp.array([1.0, 1.0, 1.0, 5.0]).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(S.ssd_loss(a, b), (1 + 0 + 1 + 4) / 4)
  np.testing.assert_allclose(S.ncc_loss(a, 3 * a + 1), 0.0, atol=1e-6)
  np.testing.assert_allclose(S.ncc_loss(a, -a), 2.0, atol=1e-6)
  # Pearson r of (0,1,2,3) and (1,1,1,5) is 0.7745967.
  np.testing.assert_allclose(S.ncc_loss(a, b), 1 - 0.7745967, atol=1e-5)


def test_lncc_identical_zero_and_inverted_two():
  a = _image(jax.random.key(0))
  np.testing.assert_allclose(S.lncc_loss(a, a, sigma=1.5), 0.0, atol=1e-3)
  np.testing.assert_allclose(S.lncc_loss(a, -a, sigma=1.5), 2.0, atol=1e-3)
  np.testing.assert_allclose(S.lncc_loss(a, -a, sigma=1.5, squared=True), 0.0, atol=1e-3)
  b = _image(jax.random.key(1))
  assert 0.5 < float(S.lncc_loss(a, b, sigma=1.5)) < 1.5
  half = jnp.zeros_like(a).at[:, :6].set(1.0)
  masked = S.lncc_loss(a, b, sigma=1.5, mask=half)
  assert float(masked) > float(S.lncc_loss(a, b, sigma=1.5)) - 0.5


def test_gaussian_blur_preserves_constants_inside_3d():
  x = jnp.ones((1, 9, 9, 9, 2))
  blurred = S.gaussian_blur(x, 1.0)
  np.testing.assert_allclose(blurred[0, 4, 4, 4], [1.0, 1.0], atol=1e-6)
  assert float(blurred[0, 0, 0, 0, 0]) < 1.0  # zero padding at the border


def test_mutual_information_hand_computed():
  # Two values sitting on bin centres with sharp Parzen windows: MI(a, a) = H(a) = log 2.
  a = jnp.array([0.0, 1.0] * 8).reshape(1, 4, 4, 1)
  sharp = dict(num_bins=2, value_range=(0.0, 1.0), bin_sigma=0.05)
  np.testing.assert_allclose(S.mutual_information_loss(a, a, **sharp), -np.log(2), atol=1e-5)
  # Inverting intensities keeps all the information (multimodal invariance).
  np.testing.assert_allclose(S.mutual_information_loss(a, 1 - a, **sharp), -np.log(2), atol=1e-5)
  # An independent pattern carries none.
  b = jnp.array([0.0, 0.0, 1.0, 1.0] * 4).reshape(1, 4, 4, 1)
  np.testing.assert_allclose(S.mutual_information_loss(a, b, **sharp), 0.0, atol=1e-5)


def test_diffusion_and_bending_hand_computed():
  grid = W.identity_map((5, 6))
  linear = (grid @ jnp.array([[0.5, 0.0], [0.0, -1.0]]).T)[None]
  # Forward differences of a linear field: (0.5, 0) along rows, (0, -1) along columns.
  pixel = dict(convention="pixel")
  np.testing.assert_allclose(L.diffusion_regularity(linear, **pixel), 0.25 / 2 + 1.0 / 2, rtol=1e-6)
  # ICON: component c in units of 1 / (S_c - 1) = (1/4, 1/5), everything times S_0**2 = 25.
  icon = 25 * ((0.5 / 4) ** 2 / 2 + (1.0 / 5) ** 2 / 2)
  np.testing.assert_allclose(L.diffusion_regularity(linear), icon, rtol=1e-6)
  np.testing.assert_allclose(L.bending_energy(linear), 0.0, atol=1e-6)
  np.testing.assert_allclose(L.bending_energy(linear, **pixel), 0.0, atol=1e-6)
  quadratic = jnp.stack([grid[..., 0] ** 2, jnp.zeros((5, 6))], -1)[None]
  # u_rr = 2 for component 0, everything else 0: (mean over 2 components of 4) / 2**2.
  np.testing.assert_allclose(L.bending_energy(quadratic, **pixel), (4.0 / 2) / 4, rtol=1e-6)
  # ICON: u_rr in unit coordinates is 2 * (1/4) / (1/4)**2 = 8 (on all 6 columns).
  np.testing.assert_allclose(L.bending_energy(quadratic), (64.0 / 2) / 4, rtol=1e-6)
  mixed = jnp.stack([grid[..., 0] * grid[..., 1], jnp.zeros((5, 6))], -1)[None]
  np.testing.assert_allclose(L.bending_energy(mixed, **pixel), 2 * (1.0 / 2) / 4, rtol=1e-6)
  # ICON: u_rc = 1 * (1/4) / ((1/4) * (1/5)) = 5.
  np.testing.assert_allclose(L.bending_energy(mixed), 2 * (25.0 / 2) / 4, rtol=1e-6)


def _icon_diffusion(u_pixels: np.ndarray) -> float:
  """icon_registration's DiffusionRegularizedNet term, written out in numpy (float64).

  ``v = identity_map - phi`` in ICON's layout ``[B, n, *S]`` and unit coordinates (spacing
  ``1 / (S_c - 1)`` on channel c); ``sum_d mean((v[x + e_d] - v[x])**2) * S_0**2``.
  """
  spatial = u_pixels.shape[1:-1]
  unit = u_pixels / (np.asarray(spatial, np.float64) - 1)
  v = -np.moveaxis(unit, -1, 1)  # identity - (identity + u)
  total = 0.0
  for d in range(len(spatial)):
    axis = 2 + d
    ahead = np.take(v, np.arange(1, v.shape[axis]), axis=axis)
    behind = np.take(v, np.arange(0, v.shape[axis] - 1), axis=axis)
    total += np.mean((-ahead + behind) ** 2)
  return total * v.shape[2] ** 2


def _icon_bending(u_pixels: np.ndarray) -> float:
  """icon_registration's BendingEnergyNet term (2D), written out in numpy (float64)."""
  spatial = u_pixels.shape[1:-1]
  s = 1.0 / (np.asarray(spatial, np.float64) - 1)
  grid = np.stack(np.meshgrid(*(np.arange(n) for n in spatial), indexing="ij"), -1)
  phi = np.moveaxis((grid + u_pixels) * s, -1, 1)  # [B, 2, H, W], unit coordinates
  dxdx = (phi[:, :, 2:] - 2 * phi[:, :, 1:-1] + phi[:, :, :-2]) / s[0] ** 2
  dydy = (phi[:, :, :, 2:] - 2 * phi[:, :, :, 1:-1] + phi[:, :, :, :-2]) / s[1] ** 2
  dxdy = (phi[:, :, 2:, 2:] + phi[:, :, :-2, :-2] - phi[:, :, 2:, :-2] - phi[:, :, :-2, 2:]) / (
    4.0 * s[0] * s[1]
  )
  return (np.mean(dxdx**2) + np.mean(dydy**2) + 2 * np.mean(dxdy**2)) / 4.0


def _linear_plus_sine(spatial):
  """``[2, *S, n]`` pixels: a linear field plus a sinusoid, the second example scaled."""
  grid = np.stack(
    np.meshgrid(*(np.arange(n, dtype=np.float64) for n in spatial), indexing="ij"), -1
  )
  matrix = np.array([[0.08, -0.03, 0.02], [0.05, 0.1, -0.04], [0.01, 0.03, 0.06]])
  n = len(spatial)
  u = grid @ matrix[:n, :n].T
  phase = sum(2 * np.pi * grid[..., d] / (spatial[d] + 3.0 * d) for d in range(n))
  u = u + 1.5 * np.stack([np.sin(phase + c) for c in range(n)], -1)
  return np.stack([u, -0.6 * u])


@pytest.mark.parametrize("spatial", [(28, 28), (16, 20), (20, 16), (9, 10, 12)])
def test_diffusion_matches_icon_registration_formula(spatial):
  u = _linear_plus_sine(spatial)
  ours = L.diffusion_regularity(jnp.asarray(u, jnp.float32))
  np.testing.assert_allclose(ours, _icon_diffusion(u), rtol=1e-6)
  # The loss wrapper uses the same term.
  image = jnp.zeros((2, *spatial, 1))
  parts = L.regularized_loss(image, image, jnp.asarray(u, jnp.float32), lmbda=0.05)
  np.testing.assert_allclose(parts["regularity"], _icon_diffusion(u), rtol=1e-6)
  np.testing.assert_allclose(parts["loss"], 0.05 * _icon_diffusion(u), rtol=1e-6)
  # The pixel convention: plain mean squared pixel differences, summed over axes.
  pixel = sum(np.mean(np.diff(u, axis=1 + d) ** 2) for d in range(len(spatial)))
  pixel_ours = L.diffusion_regularity(jnp.asarray(u, jnp.float32), convention="pixel")
  np.testing.assert_allclose(pixel_ours, pixel, rtol=1e-6)
  if len(set(spatial)) == 1:
    # On a square N grid ICON's value is (N / (N - 1))**2 the pixel one (about 7.5% at 28).
    n = spatial[0]
    np.testing.assert_allclose(ours / pixel_ours, (n / (n - 1)) ** 2, rtol=1e-6)
  else:
    # Elsewhere component c is weighed by (S_0 / (S_c - 1))**2: no single factor, but not 1.
    assert abs(float(ours) / pixel - 1) > 1e-2


@pytest.mark.parametrize("spatial", [(28, 28), (16, 20)])
def test_bending_matches_icon_registration_formula(spatial):
  u = _linear_plus_sine(spatial)
  ours = L.bending_energy(jnp.asarray(u, jnp.float32))
  np.testing.assert_allclose(ours, _icon_bending(u), rtol=1e-5)
  image = jnp.zeros((2, *spatial, 1))
  parts = L.regularized_loss(
    image, image, jnp.asarray(u, jnp.float32), lmbda=1.0, regularizer="bending"
  )
  np.testing.assert_allclose(parts["regularity"], _icon_bending(u), rtol=1e-5)


def test_icon_zero_for_exact_inverses():
  shift = jnp.array([1.25, -0.75])
  u_ab = jnp.broadcast_to(shift, (2, 10, 11, 2))
  u_ba = -u_ab
  key = jax.random.key(3)
  np.testing.assert_allclose(L.inverse_consistency(u_ab, u_ba, key, (10, 11)), 0.0, atol=1e-10)
  np.testing.assert_allclose(
    L.gradient_inverse_consistency(u_ab, u_ba, key, (10, 11)), 0.0, atol=1e-6
  )
  # Not inverse: a known constant error of |2 * shift|^2 per point (on average per component).
  value = L.inverse_consistency(u_ab, u_ab, key, (10, 11))
  np.testing.assert_allclose(value, 2 * jnp.mean(jnp.square(2 * shift)), rtol=1e-5)
  # Translation-only composition has zero Jacobian error even when not inverse.
  np.testing.assert_allclose(
    L.gradient_inverse_consistency(u_ab, u_ab, key, (10, 11)), 0.0, atol=1e-6
  )
  # ICON units: the same error scaled by 1 / (N - 1) per axis.
  unit = L.inverse_consistency(u_ab, u_ab, key, (10, 11), spacing=W.unit_spacing((10, 11)))
  np.testing.assert_allclose(unit, (2.5 / 9) ** 2 + (1.5 / 10) ** 2, rtol=1e-5)


def test_gradicon_detects_non_inverse_scaling():
  grid = W.identity_map((12, 12))
  u_ab = (0.2 * (grid - 5.5))[None]  # phi_ab = scale by 1.2 about the centre
  u_ba = jnp.zeros_like(u_ab)
  # Jacobian of x - phi_ab(x) is -0.2 I: squared Frobenius 0.04 per axis.
  value = L.gradient_inverse_consistency(
    u_ab, u_ba, jax.random.key(0), (12, 12), noise=0.3, delta=0.01
  )
  # Mean over the two components; border clamping flattens the field at a few jittered points.
  np.testing.assert_allclose(value, 2 * 0.04 / 2, rtol=0.12)
  sparse = L.gradient_inverse_consistency(
    u_ab, u_ba, jax.random.key(0), (12, 12), noise=0.3, stride=2
  )
  np.testing.assert_allclose(sparse, value, rtol=0.15)


def test_loss_wrappers_return_their_parts():
  keys = jax.random.split(jax.random.key(4), 3)
  moving, fixed = _image(keys[0]), _image(keys[1])
  u_ab = 0.5 * jax.random.normal(keys[2], (2, 12, 12, 2))
  u_ba = -u_ab
  for fn in (L.icon_loss, L.gradicon_loss):
    parts = jax.jit(functools.partial(fn, lmbda=2.0))(moving, fixed, u_ab, u_ba, jax.random.key(5))
    assert set(parts) == {
      "loss",
      "similarity",
      "inverse_consistency",
      "transform_magnitude",
      "folds",
    }
    np.testing.assert_allclose(
      parts["loss"], parts["similarity"] + 2.0 * parts["inverse_consistency"], rtol=1e-6
    )
    np.testing.assert_allclose(parts["transform_magnitude"], jnp.mean(u_ab**2), rtol=1e-6)
  sparse = jax.jit(functools.partial(L.gradicon_loss, lmbda=2.0, sparse=True))(
    moving, fixed, u_ab, u_ba, jax.random.key(5)
  )
  assert jnp.isfinite(sparse["loss"])
  parts = L.regularized_loss(moving, fixed, jnp.zeros_like(u_ab), lmbda=0.05)
  np.testing.assert_allclose(parts["similarity"], 2 * S.ssd_loss(moving, fixed), rtol=1e-6)
  np.testing.assert_allclose(parts["regularity"], 0.0)
  np.testing.assert_allclose(parts["folds"], 0.0)
  grads = jax.jit(
    jax.grad(lambda u: L.icon_loss(moving, fixed, u, u_ba, jax.random.key(5), lmbda=1.0)["loss"])
  )(u_ab)
  assert grads.shape == u_ab.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_loss_wrappers_accept_transforms():
  moving, fixed = _image(jax.random.key(6)), _image(jax.random.key(7))
  u = jnp.broadcast_to(jnp.array([0.5, 1.0]), (2, 12, 12, 2))
  phi = lambda x: x + jnp.array([0.5, 1.0])  # noqa: E731
  from_field = L.icon_loss(moving, fixed, u, -u, jax.random.key(0), lmbda=1.0)
  from_fn = L.icon_loss(
    moving, fixed, phi, lambda x: x - jnp.array([0.5, 1.0]), jax.random.key(0), lmbda=1.0
  )
  for name in from_field:
    np.testing.assert_allclose(from_fn[name], from_field[name], atol=1e-6)


def test_mammoregnet_loss_matches_reference_formulas():
  keys = jax.random.split(jax.random.key(8), 4)
  fixed, warped, affine = (_image(k, (2, 8, 9, 1)) for k in keys[:3])
  flow = 0.7 * jax.random.normal(keys[3], (2, 8, 9, 2))
  parts = jax.jit(mammoregnet_losses.mammoregnet_loss)(fixed, warped, affine, flow)
  f, w, a, u = (np.asarray(x, np.float64) for x in (fixed, warped, affine, flow))
  ncc = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
  np.testing.assert_allclose(parts["ncc"], ncc(f, w), rtol=1e-4)
  np.testing.assert_allclose(parts["ncc_affine"], ncc(f, a), rtol=1e-4)
  smooth = 0.5 * (np.mean(np.diff(u, axis=2) ** 2) + np.mean(np.diff(u, axis=1) ** 2))
  np.testing.assert_allclose(parts["smoothness"], smooth, rtol=1e-5)
  dr, dc = u[:, 1:, :-1] - u[:, :-1, :-1], u[:, :-1, 1:] - u[:, :-1, :-1]
  det = (1 + dr[..., 0]) * (1 + dc[..., 1]) - dc[..., 0] * dr[..., 1]
  np.testing.assert_allclose(parts["negative_jacobian"], np.sum(np.maximum(-det, 0)), rtol=1e-5)
  total = (1 - ncc(f, a)) + (1 - ncc(f, w)) + smooth + 1e-5 * np.sum(np.maximum(-det, 0))
  np.testing.assert_allclose(parts["loss"], total, rtol=1e-5)
  # The reference's determinant treats channel 0 as x (columns).
  ref_det = (1 + dc[..., 0]) * (1 + dr[..., 1]) - dc[..., 1] * dr[..., 0]
  ref = mammoregnet_losses.mammoregnet_loss(fixed, warped, affine, flow, reference_jacobian=True)
  np.testing.assert_allclose(ref["negative_jacobian"], np.sum(np.maximum(-ref_det, 0)), rtol=1e-5)
  # A constant image has undefined correlation: the reference maps NaN to 0.
  np.testing.assert_allclose(
    mammoregnet_losses.mammoregnet_ncc(jnp.ones((1, 4, 4, 1)), fixed[:1, :4, :4]), 0.0
  )


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="same shape"):
    S.ssd_loss(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 5, 1)))
  with pytest.raises(ValueError, match="displacement"):
    L.diffusion_regularity(jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="convention"):
    L.diffusion_regularity(jnp.zeros((1, 4, 4, 2)), convention="voxel")
  with pytest.raises(ValueError, match="regularizer"):
    L.regularized_loss(
      jnp.zeros((1, 4, 4, 1)),
      jnp.zeros((1, 4, 4, 1)),
      jnp.zeros((1, 4, 4, 2)),
      lmbda=1.0,
      regularizer="tv",
    )


@pytest.mark.parametrize("shape", [(1, 20, 18, 1), (1, 10, 9, 8, 1)])
def test_mind_is_invariant_to_affine_intensity_changes(shape):
  image = jax.random.uniform(jax.random.key(0), shape)
  image = S.gaussian_blur(image, 1.0)  # smooth structure, so shifts change the descriptors
  assert float(S.mind_loss(image, 1.0 - image)) < 1e-4
  assert float(S.mind_loss(image, 3.0 * image + 0.5)) < 1e-4
  assert float(S.mind_loss(image, jnp.roll(image, 3, axis=1))) > 1e-2
