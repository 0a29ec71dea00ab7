"""The fusion barrier (mammojax/nn/fusion_barrier.py): identity on values, kept by XLA:CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.nn.fusion_barrier import fusion_barrier


@pytest.mark.parametrize("first_dtype", [jnp.float32, jnp.int32, jnp.bfloat16])
def test_values_pass_unchanged_and_the_loop_survives_compilation(first_dtype):
  first = jnp.arange(12, dtype=first_dtype).reshape(3, 4) - 5
  second = jnp.linspace(-2.0, 3.0, 7)

  def f(a, b):
    a2, b2 = fusion_barrier(a * 2, jnp.exp(b))
    return a2 + 1, b2 * 3

  compiled = jax.jit(f).lower(first, second).compile()
  out_a, out_b = compiled(first, second)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(first * 2 + 1))
  np.testing.assert_allclose(out_b, np.exp(np.asarray(second)) * 3, rtol=1e-6)
  if jax.default_backend() == "cpu":
    # The barrier is a while loop on CPU; had XLA proven its trip count zero, it would be gone
    # and the producers would fuse into the consumers again.
    assert " while(" in compiled.as_text()


def test_works_inside_a_custom_vjp():
  @jax.custom_vjp
  def square(x):
    y, = fusion_barrier(x * x)
    return y

  square.defvjp(lambda x: (square(x), x),
                lambda x, g: (fusion_barrier(2.0 * x * g)[0],))
  x = jnp.asarray([1.0, -2.0, 3.0])
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(square(v)))(x), 2.0 * np.asarray(x))
