"""Sampling, warping, displacement algebra and Jacobians (mammojax/nn/warp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from mammojax.nn import warp as W

# jax.scipy 'constant' corresponds to scipy's 'grid-constant' (per-corner zeros).
_SCIPY_MODE = {"zeros": "grid-constant", "border": "nearest", "reflect": "reflect"}


def _scipy_sample(source, coords, order, padding):
  batch, channels = source.shape[0], source.shape[-1]
  out = np.zeros(coords.shape[:-1] + (channels,), np.float64)
  for b in range(batch):
    points = np.moveaxis(coords[b], -1, 0)
    for c in range(channels):
      out[b, ..., c] = ndi.map_coordinates(
        source[b, ..., c].astype(np.float64), points, order=order, mode=_SCIPY_MODE[padding]
      )
  return out


def _off_ties(coords):
  """Moves coordinates away from .5 ties (nearest rounding differs across libraries there)."""
  frac = coords - np.floor(coords)
  return np.where(np.abs(frac - 0.5) < 0.02, coords + 0.1, coords)


# 3 channels: the two last-axis corners are gathered as one two-row slice; 6: one row per corner.
@pytest.mark.parametrize("channels", [3, 6])
@pytest.mark.parametrize("spatial", [(5, 6), (4, 5, 3)])
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflect"])
@pytest.mark.parametrize("impl", ["gather", "map_coordinates"])
def test_sample_matches_scipy(spatial, order, padding, impl, channels):
  rng = np.random.default_rng(0)
  source = rng.normal(size=(2, *spatial, channels)).astype(np.float32)
  coords = rng.uniform(-4, max(spatial) + 3, size=(2, 4, 5, len(spatial))).astype(np.float32)
  coords = _off_ties(coords)
  expected = _scipy_sample(source, coords, order, padding)
  got = W.sample(jnp.asarray(source), jnp.asarray(coords), order=order, padding=padding, impl=impl)
  assert got.shape == (2, 4, 5, channels)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)


def test_integer_translation_and_zero_fill():
  source = jnp.arange(2 * 4 * 5 * 2, dtype=jnp.float32).reshape(2, 4, 5, 2)
  displacement = jnp.zeros((2, 4, 5, 2)).at[..., 0].set(1.0).at[..., 1].set(-2.0)
  for impl in ("gather", "map_coordinates"):
    out = W.warp(source, displacement, impl)
    np.testing.assert_allclose(out[:, :3, 2:], source[:, 1:, :3])
    np.testing.assert_allclose(out[:, 3:], 0.0)  # rows beyond the bottom edge
    np.testing.assert_allclose(out[:, :, :2], 0.0)  # columns left of the edge


def test_rotation_by_90_degrees():
  # phi(r, c) = (c, n - 1 - r) on a square grid is an exact 90-degree rotation of the pixels.
  n = 5
  source = jax.random.normal(jax.random.key(1), (1, n, n, 3))
  grid = W.identity_map((n, n))
  target = jnp.stack([grid[..., 1], n - 1 - grid[..., 0]], axis=-1)
  out = W.warp(source, (target - grid)[None], order=1)
  np.testing.assert_allclose(out[0], np.rot90(np.asarray(source[0]), k=1, axes=(0, 1)), atol=1e-6)
  np.testing.assert_allclose(out[0, 1, 3], source[0, 3, n - 2], atol=1e-6)


@pytest.mark.parametrize("channels", [1, 4, 6])
@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 6)])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflect"])
def test_gather_equals_map_coordinates_values_and_gradients(padding, spatial, channels):
  keys = jax.random.split(jax.random.key(2), 3)
  source = jax.random.normal(keys[0], (2, *spatial, channels))
  displacement = 2.5 * jax.random.normal(keys[1], (2, *spatial, len(spatial)))
  # Some points exactly on pixel centres, the first and last included (identity map at init).
  displacement = displacement.at[:, 0].set(0.0).at[:, -1].set(0.0)
  cotangent = jax.random.normal(keys[2], (2, *spatial, channels))

  def loss(impl):
    return lambda s, d: jnp.sum(W.warp(s, d, impl, padding=padding) * cotangent)

  value_g, grads_g = jax.value_and_grad(loss("gather"), argnums=(0, 1))(source, displacement)
  value_m, grads_m = jax.value_and_grad(loss("map_coordinates"), argnums=(0, 1))(
    source, displacement
  )
  np.testing.assert_allclose(value_g, value_m, rtol=1e-5)
  for got, want in zip(grads_g, grads_m):
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflect"])
@pytest.mark.parametrize("channels", [2, 6])  # the paired (<= 4 channels) and per-corner paths
def test_gather_gradients_match_finite_differences_2d_and_3d(padding, channels):
  for spatial in [(4, 5), (3, 4, 3)]:
    keys = jax.random.split(jax.random.key(len(spatial)), 2)
    source = jax.random.normal(keys[0], (1, *spatial, channels))
    # Keep coordinates off integer grid lines and off reflect's fold at N - 0.5, where the
    # interpolation has kinks.
    displacement = jnp.full((1, *spatial, len(spatial)), 0.17) + 0.2 * jax.random.uniform(
      keys[1], (1, *spatial, len(spatial))
    )
    fn = lambda s, d: W.warp(s, d, "gather", padding=padding)  # noqa: E731
    check_grads(fn, (source, displacement), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


def test_compose_and_jacobian_gradients_match_finite_differences():
  keys = jax.random.split(jax.random.key(7), 2)
  outer = 0.3 * jax.random.normal(keys[0], (1, 5, 4, 2))
  inner = jnp.full((1, 5, 4, 2), 0.23) + 0.1 * jax.random.uniform(keys[1], (1, 5, 4, 2))
  check_grads(
    W.compose_displacements, (outer, inner), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2
  )
  for method in ("central", "forward"):
    check_grads(
      lambda u: W.jacobian_determinant(u, method=method),
      (outer,),
      order=1,
      modes=["rev"],
      eps=1e-3,
      atol=2e-2,
      rtol=2e-2,
    )


def test_3d_trilinear_matches_linear_function():
  # Trilinear interpolation reproduces an affine function exactly inside the volume.
  spatial = (4, 5, 6)
  grid = W.identity_map(spatial)
  source = (1.0 + grid @ jnp.array([0.5, -1.0, 2.0]))[None, ..., None]
  displacement = jax.random.uniform(jax.random.key(3), (1, *spatial, 3), minval=-0.4, maxval=0.4)
  coords = jnp.clip(grid + displacement[0], 0, jnp.array(spatial) - 1.0)
  displacement = (coords - grid)[None]
  for impl in ("gather", "map_coordinates"):
    out = W.warp(source, displacement, impl)
    np.testing.assert_allclose(
      out[0, ..., 0], 1.0 + coords @ jnp.array([0.5, -1.0, 2.0]), atol=1e-5
    )


def test_warp_bfloat16_keeps_dtype_and_exact_positions():
  # A shift of exactly one column must stay exact at column 300, where bfloat16 steps by 2.
  source = jnp.tile((jnp.arange(320) % 7.0)[None, None, :, None], (1, 2, 1, 2))
  displacement = jnp.zeros((1, 2, 320, 2), jnp.bfloat16).at[..., 1].set(1.0)
  for impl in ("gather", "map_coordinates"):
    out = W.warp(source.astype(jnp.bfloat16), displacement, impl)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out[0, 0, 299:301, 0], np.float32), [300 % 7, 301 % 7])


def test_bad_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="resize_displacement"):
    W.warp(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 5, 4, 2)))
  with pytest.raises(ValueError, match="padding"):
    W.warp(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 2)), padding="wrap")
  with pytest.raises(ValueError, match="order"):
    W.sample(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 2, 2)), order=3)


def test_resize_displacement_rescales_values_2d_and_3d():
  constant = jnp.ones((1, 4, 6, 2)) * jnp.array([1.0, 2.0])
  out = W.resize_displacement(constant, (8, 3))
  np.testing.assert_allclose(out, jnp.ones((1, 8, 3, 2)) * jnp.array([2.0, 1.0]), rtol=1e-6)
  volume = jnp.ones((1, 3, 4, 5, 3))
  out = W.resize_displacement(volume, (5, 7, 9), align_corners=True)
  np.testing.assert_allclose(out[0, 0, 0, 0], [2.0, 2.0, 2.0], rtol=1e-6)
  # A linear field is preserved by align_corners resizing (corner centres coincide).
  field = W.identity_map((3, 4))[None] * 0.5
  out = W.resize_displacement(field, (5, 7), align_corners=True)
  np.testing.assert_allclose(out, W.identity_map((5, 7))[None] * 0.5, atol=1e-5)


def test_composition_of_translations_is_their_sum():
  u = jnp.ones((1, 6, 7, 2)) * jnp.array([1.5, -0.5])
  v = jnp.ones((1, 6, 7, 2)) * jnp.array([-0.25, 2.0])
  np.testing.assert_allclose(W.compose_displacements(u, v), u + v, atol=1e-6)


def test_composition_order_matches_sequential_warps():
  # warp(warp(I, outer), inner) == warp(I, compose(outer, inner)) for the linear parts.
  spatial = (8, 9)
  grid = W.identity_map(spatial)
  outer = (0.1 * grid @ jnp.array([[1.0, 0.5], [0.0, -1.0]]))[None]  # linear maps
  inner = (jnp.ones(grid.shape) * jnp.array([0.5, 0.25]))[None]
  image = (grid @ jnp.array([1.0, 3.0]))[None, ..., None]
  composed = W.compose_displacements(outer, inner)
  twice = W.warp(W.warp(image, outer, padding="border"), inner, padding="border")
  once = W.warp(image, composed, padding="border")
  np.testing.assert_allclose(twice[:, 1:4, 1:4], once[:, 1:4, 1:4], atol=1e-4)


def test_composing_smooth_field_with_its_inverse_is_identity():
  spatial = (24, 24)
  grid = W.identity_map(spatial)
  u = 0.8 * jnp.stack([jnp.sin(grid[..., 1] / 4.0), jnp.cos(grid[..., 0] / 5.0)], -1)[None]
  # Fixed-point inverse: v(x) = -u(x + v(x)).
  v = -u
  for _ in range(30):
    v = -W.sample(u, grid[None] + v, padding="border")
  residual = W.compose_displacements(u, v)
  assert float(jnp.max(jnp.abs(residual[:, 3:-3, 3:-3]))) < 0.02


def test_unit_and_grid_sample_conversions():
  spatial = (5, 9)
  pixels = jnp.array([[0.0, 0.0], [4.0, 8.0], [2.0, 4.0]])
  np.testing.assert_allclose(W.pixels_to_unit(pixels, spatial), [[0, 0], [1, 1], [0.5, 0.5]])
  np.testing.assert_allclose(
    W.unit_to_pixels(W.pixels_to_unit(pixels, spatial), spatial), pixels, atol=1e-6
  )
  grid = W.pixels_to_grid_sample(pixels, spatial, align_corners=True)
  np.testing.assert_allclose(grid, [[-1, -1], [1, 1], [0, 0]], atol=1e-6)
  grid = W.pixels_to_grid_sample(jnp.array([[-0.5, -0.5]]), spatial, align_corners=False)
  np.testing.assert_allclose(grid, [[-1, -1]], atol=1e-6)
  for align in (True, False):
    for disp in (True, False):
      back = W.grid_sample_to_pixels(
        W.pixels_to_grid_sample(pixels, spatial, align_corners=align, displacement=disp),
        spatial,
        align_corners=align,
        displacement=disp,
      )
      np.testing.assert_allclose(back, pixels, atol=1e-5)


def test_warp_equals_torch_grid_sample():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(4)
  source = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  displacement = rng.normal(scale=2.0, size=(2, 5, 7, 2)).astype(np.float32)
  coords = np.asarray(W.identity_map((5, 7)))[None] + displacement
  for padding, torch_padding in [("zeros", "zeros"), ("border", "border")]:
    for align in (True, False):
      grid = np.array(W.pixels_to_grid_sample(jnp.asarray(coords), (5, 7), align_corners=align))
      want = torch.nn.functional.grid_sample(
        torch.from_numpy(source).permute(0, 3, 1, 2),
        torch.from_numpy(grid),
        mode="bilinear",
        padding_mode=torch_padding,
        align_corners=align,
      )
      got = W.warp(jnp.asarray(source), jnp.asarray(displacement), padding=padding)
      np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_jacobian_determinant_of_affine_map():
  matrix = jnp.array([[1.2, 0.3], [-0.4, 0.9]])
  grid = W.identity_map((6, 7))
  displacement = (grid @ matrix.T - grid)[None]
  for method in ("central", "forward"):
    det = W.jacobian_determinant(displacement, method=method)
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-5)
  matrix3 = jnp.array([[1.1, 0.2, 0.0], [0.0, 0.8, 0.1], [0.3, 0.0, 1.3]])
  grid3 = W.identity_map((4, 5, 3))
  det3 = W.jacobian_determinant((grid3 @ matrix3.T - grid3)[None])
  np.testing.assert_allclose(det3, np.linalg.det(matrix3), rtol=1e-5)
  assert int(W.count_folds((grid3 @ matrix3.T - grid3)[None])[0]) == 0


def test_fold_count_of_folding_field():
  grid = W.identity_map((8, 8))
  # Mirror the columns: phi(r, c) = (r, 7 - c) has determinant -1 everywhere.
  folding = jnp.stack([grid[..., 0], 7.0 - grid[..., 1]], -1) - grid
  assert int(W.count_folds(folding[None])[0]) == 64
  assert int(W.count_folds(folding[None], method="forward")[0]) == 49
  assert int(W.count_folds(jnp.zeros((1, 8, 8, 2)))[0]) == 0
