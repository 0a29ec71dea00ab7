"""DepthwiseConv: the shifted multiply-add lowering equals XLA's grouped convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.nn.depthwise_conv import DepthwiseConv


@pytest.mark.parametrize(
  "kernel,stride,padding,shape",
  [
    (3, 1, ((1, 1), (1, 1)), (2, 9, 7, 5)),
    (5, 2, ((2, 2), (2, 2)), (2, 11, 10, 3)),
    (3, 2, ((0, 1), (0, 1)), (1, 8, 9, 4)),  # static SAME padding, asymmetric
    (5, 1, ((0, 0), (1, 3)), (1, 6, 5, 2)),
  ],
)
def test_taps_equal_grouped_convolution_values_and_gradients(kernel, stride, padding, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  modules = {
    impl: DepthwiseConv((kernel, kernel), strides=(stride, stride), padding=padding, impl=impl)
    for impl in ("taps", "conv")
  }
  variables = modules["conv"].init(jax.random.key(1), x)
  assert variables["params"]["kernel"].shape == (kernel, kernel, 1, shape[-1])
  outputs = {impl: m.apply(variables, x) for impl, m in modules.items()}
  assert outputs["taps"].shape == outputs["conv"].shape
  np.testing.assert_allclose(outputs["taps"], outputs["conv"], rtol=1e-5, atol=1e-5)

  def loss(impl):
    return lambda v, x: jnp.sum(jnp.sin(modules[impl].apply(v, x)))

  want = jax.grad(loss("conv"), argnums=(0, 1))(variables, x)
  got = jax.grad(loss("taps"), argnums=(0, 1))(variables, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_auto_and_bad_impl():
  x = jnp.ones((1, 4, 4, 2))
  auto = DepthwiseConv((3, 3), padding=((1, 1), (1, 1)))
  variables = auto.init(jax.random.key(0), x)
  conv = DepthwiseConv((3, 3), padding=((1, 1), (1, 1)), impl="conv")
  np.testing.assert_allclose(auto.apply(variables, x), conv.apply(variables, x), atol=1e-6)
  with pytest.raises(ValueError, match="impl must be"):
    DepthwiseConv((3, 3), impl="fft").apply(variables, x)
  with pytest.raises(ValueError, match="smaller than the kernel"):
    DepthwiseConv((3, 3), impl="taps").apply(variables, jnp.ones((1, 2, 2, 2)))
