"""ICON-style transforms and registration modules (mammojax/models/registration/icon.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.losses import registration as losses
from mammojax.models.registration import icon
from mammojax.nn import warp as W
from mammojax.nn.resize import avg_pool_half


class ConstantShift(nn.Module):
  """Test network: a learnable constant displacement, initialised to ``value``."""

  value: tuple = (0.0, 0.0)

  @nn.compact
  def __call__(self, moving, fixed):
    shift = self.param("shift", lambda _: jnp.asarray(self.value, jnp.float32))
    return jnp.broadcast_to(shift, moving.shape[:-1] + (len(self.value),))


def _images(key, shape=(2, 28, 28, 1)):
  k1, k2 = jax.random.split(key)
  return jax.random.uniform(k1, shape), jax.random.uniform(k2, shape)


def test_digits_mlp_starts_at_identity_and_has_seed_sizes():
  moving, fixed = _images(jax.random.key(0))
  net = icon.digits_registration((28, 28), hidden=50, num_steps=9)
  variables = net.init(jax.random.key(1), moving, fixed)
  params = nn.meta.unbox(variables)["params"]
  # One shared set of MLP parameters for all nine steps.
  assert list(params) == ["steps_0"]
  mlp = params["steps_0"]["net"]
  assert mlp["dense1"]["kernel"].shape == (28 * 28 * 2, 50)
  assert mlp["dense2"]["kernel"].shape == (50, 50)
  assert mlp["dense3"]["kernel"].shape == (50, 28 * 28 * 2)
  np.testing.assert_array_equal(mlp["dense3"]["kernel"], 0.0)
  displacement = net.apply(variables, moving, fixed)
  assert displacement.shape == (2, 28, 28, 2)
  np.testing.assert_array_equal(displacement, 0.0)


def test_nested_two_step_equals_multi_step_with_shared_weights():
  moving, fixed = _images(jax.random.key(2), (1, 8, 8, 1))
  inner = icon.FunctionFromVectorField(icon.DigitsMLP((8, 8), hidden=6))
  nested = inner
  for _ in range(3):
    nested = icon.TwoStepRegistration(nested, inner)
  flat = icon.MultiStepRegistration((inner,) * 4)
  variables = flat.init(jax.random.key(3), moving, fixed)
  # Give the last layer non-zero weights so the steps actually move.
  variables = jax.tree_util.tree_map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), nn.meta.unbox(variables)
  )
  nested_vars = {"params": {"first": {"first": {"first": variables["params"]["steps_0"]}}}}
  want = jax.jit(flat.apply)(variables, moving, fixed)
  got = jax.jit(nested.apply)(nested_vars, moving, fixed)
  assert float(jnp.max(jnp.abs(want))) > 1e-3
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_two_translations_compose_to_their_sum():
  moving, fixed = _images(jax.random.key(5), (1, 10, 12, 1))
  net = icon.TwoStepRegistration(
    icon.FunctionFromVectorField(ConstantShift((1.5, -2.0)), units="pixels"),
    icon.FunctionFromVectorField(ConstantShift((0.25, 0.5)), units="pixels"),
  )
  variables = net.init(jax.random.key(0), moving, fixed)
  np.testing.assert_allclose(
    net.apply(variables, moving, fixed),
    jnp.broadcast_to(jnp.array([1.75, -1.5]), (1, 10, 12, 2)),
    atol=1e-6,
  )
  points = jnp.array([[[3.2, 4.7], [0.0, 0.0]]])
  np.testing.assert_allclose(
    net.apply(variables, moving, fixed, points), points + jnp.array([1.75, -1.5]), atol=1e-6
  )
  phi = net.apply(variables, moving, fixed, method="transform")
  np.testing.assert_allclose(phi(points), points + jnp.array([1.75, -1.5]), atol=1e-6)


def test_unit_outputs_are_converted_to_pixels():
  moving, fixed = _images(jax.random.key(6), (1, 5, 9, 1))
  net = icon.FunctionFromVectorField(ConstantShift((0.25, 0.5)))  # ICON unit coordinates
  displacement = net.apply(net.init(jax.random.key(0), moving, fixed), moving, fixed)
  np.testing.assert_allclose(displacement[0, 0, 0], [0.25 * 4, 0.5 * 8], atol=1e-6)


def test_downsample_registration_keeps_unit_displacement():
  moving, fixed = _images(jax.random.key(7), (1, 9, 7, 1))
  net = icon.DownsampleRegistration(icon.FunctionFromVectorField(ConstantShift((0.5, 0.25))))
  displacement = net.apply(net.init(jax.random.key(0), moving, fixed), moving, fixed)
  # Half a unit along rows is 4 pixels of the 9-row grid whatever the child's resolution.
  np.testing.assert_allclose(
    displacement, jnp.broadcast_to(jnp.array([4.0, 1.5]), (1, 9, 7, 2)), atol=1e-5
  )


def test_avg_pool_half_ceil_mode():
  image = jnp.arange(15.0).reshape(1, 3, 5, 1)
  pooled = avg_pool_half(image)
  assert pooled.shape == (1, 2, 3, 1)
  np.testing.assert_allclose(pooled[0, :, :, 0], [[3.0, 5.0, 6.5], [10.5, 12.5, 14.0]])


def test_three_d_two_step():
  moving, fixed = _images(jax.random.key(8), (1, 4, 5, 6, 1))
  net = icon.TwoStepRegistration(
    icon.FunctionFromVectorField(ConstantShift((1.0, 0.0, -1.0)), units="pixels"),
    icon.FunctionFromVectorField(ConstantShift((0.5, 0.5, 0.5)), units="pixels"),
  )
  displacement = net.apply(net.init(jax.random.key(0), moving, fixed), moving, fixed)
  np.testing.assert_allclose(
    displacement, jnp.broadcast_to(jnp.array([1.5, 0.5, -0.5]), (1, 4, 5, 6, 3)), atol=1e-6
  )


def test_digits_demo_trains_to_lower_loss():
  """Two Adam steps of the seed's setup (diffusion-regularised SSD) lower the loss."""
  optax = pytest.importorskip("optax")
  size = (8, 8)
  grid = W.identity_map(size)
  blob = lambda centre: jnp.exp(-jnp.sum((grid - centre) ** 2, -1) / 4.0)[None, ..., None]  # noqa: E731
  moving, fixed = blob(jnp.array([3.0, 3.0])), blob(jnp.array([4.0, 4.5]))
  net = icon.digits_registration(size, hidden=16, num_steps=3)
  params = nn.meta.unbox(net.init(jax.random.key(0), moving, fixed))

  def loss_fn(p):
    phi = net.apply(p, moving, fixed, method="transform")
    return losses.regularized_loss(moving, fixed, phi, lmbda=0.05)["loss"]

  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(p, updates), state, loss

  state = optimizer.init(params)
  params, state, first = step(params, state)
  for _ in range(4):
    params, state, _ = step(params, state)
  _, _, last = step(params, state)
  assert float(last) < float(first)


def test_bad_inputs_raise():
  net = icon.digits_registration((28, 28), num_steps=1)
  with pytest.raises(ValueError, match="spatial_shape"):
    net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="same shape"):
    net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 27, 28, 1)))


def _unrolled(fields, coordinates):
  """Reference: the chain written out as nested closures over ``warp.sample``."""
  for field in fields[::-1]:
    coordinates = coordinates + W.sample(field, coordinates, padding="border")
  return coordinates


def test_displacement_chain_matches_nested_samples_values_and_gradients():
  key = jax.random.key(11)
  fields = 0.8 * jax.random.normal(key, (4, 2, 7, 9, 2))
  points = jax.random.uniform(jax.random.key(12), (2, 5, 3, 2), maxval=8.0) - 1.0
  chain = icon.compose(*[icon.displacement_transform(f) for f in fields])
  assert isinstance(chain, icon.DisplacementChain) and chain.fields.shape == (4, 2, 7, 9, 2)
  np.testing.assert_allclose(chain(points), _unrolled(fields, points), rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda f, p: jnp.sum(jnp.sin(fn(f, p)))

  want = jax.grad(loss(_unrolled), argnums=(0, 1))(fields, points)
  got = jax.grad(loss(lambda f, p: icon.DisplacementChain(f)(p)), argnums=(0, 1))(fields, points)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(w))) > 1e-3
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_displacement_chain_on_grid_equals_evaluating_the_grid():
  fields = 1.5 * jax.random.normal(jax.random.key(13), (3, 2, 6, 5, 2))
  chain = icon.DisplacementChain(fields)
  grid = jnp.broadcast_to(W.identity_map((6, 5)), (2, 6, 5, 2))
  np.testing.assert_allclose(chain.on_grid(), _unrolled(fields, grid), atol=1e-5)
  want = jax.grad(lambda f: jnp.sum(_unrolled(f, grid) ** 2))(fields)
  got = jax.grad(lambda f: jnp.sum(icon.DisplacementChain(f).on_grid() ** 2))(fields)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_compose_mixes_chains_and_other_transforms():
  fields = jax.random.normal(jax.random.key(14), (2, 1, 6, 6, 2))
  shift = lambda x: x + jnp.array([0.5, -0.25])  # noqa: E731
  composed = icon.compose(
    icon.displacement_transform(fields[0]), shift, icon.displacement_transform(fields[1])
  )
  assert not isinstance(composed, icon.DisplacementChain)
  points = jax.random.uniform(jax.random.key(15), (1, 4, 2), maxval=5.0)
  inner = points + W.sample(fields[1], points, padding="border")
  want = shift(inner)
  want = want + W.sample(fields[0], want, padding="border")
  np.testing.assert_allclose(composed(points), want, atol=1e-5)
