"""computed_apart (mammojax/nn/fusion_barrier.py): same values and gradients, kept by XLA:CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.nn.fusion_barrier import computed_apart


@pytest.mark.parametrize("first_dtype", [jnp.float32, jnp.int32, jnp.bfloat16])
def test_values_pass_unchanged_and_the_region_survives_compilation(first_dtype):
  first = jnp.arange(12, dtype=first_dtype).reshape(3, 4) - 5
  second = jnp.linspace(-2.0, 3.0, 7)

  def f(a, b):
    a2, b2 = computed_apart(lambda x, y: (x * 2, jnp.exp(y)), a, b)
    return a2 + 1, b2 * 3

  compiled = jax.jit(f).lower(first, second).compile()
  out_a, out_b = compiled(first, second)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(first * 2 + 1))
  np.testing.assert_allclose(out_b, np.exp(np.asarray(second)) * 3, rtol=1e-6)
  if jax.default_backend() == "cpu":
    # Had XLA proven the predicate constant, the conditional would be gone and the producers
    # would fuse into the consumers again.
    assert " conditional(" in compiled.as_text()


def test_pytrees_and_gradients_in_both_modes():
  x = jnp.asarray([1.0, -2.0, 3.0])

  def f(v):
    out = computed_apart(lambda t: {"square": t["v"] ** 2, "cube": t["v"] ** 3}, {"v": v})
    return jnp.sum(out["square"] + out["cube"])

  expected = 2.0 * np.asarray(x) + 3.0 * np.asarray(x) ** 2
  np.testing.assert_allclose(jax.grad(f)(x), expected, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), expected, rtol=1e-6)
  _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
  np.testing.assert_allclose(tangent, expected.sum(), rtol=1e-6)


def test_works_inside_a_custom_vjp():
  @jax.custom_vjp
  def square(x):
    return computed_apart(lambda v: v * v, x)

  square.defvjp(lambda x: (square(x), x), lambda x, g: (computed_apart(jnp.multiply, 2.0 * x, g),))
  x = jnp.asarray([1.0, -2.0, 3.0])
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(square(v)))(x), 2.0 * np.asarray(x))


def test_needs_an_array_argument():
  with pytest.raises(ValueError, match="at least one array"):
    jax.jit(lambda: computed_apart(lambda: jnp.zeros(3)))()
