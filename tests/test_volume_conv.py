"""3-D convolutions as 2-D convolutions over the depth taps (XLA:CPU's fast route) give
``nn.Conv``'s values and gradients, with ``nn.Conv``'s parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mammojax.nn.conv_blocks import TransposedConvStride2
from mammojax.nn.volume_conv import Conv, use_depth_taps

CASES = [
  ((3, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1))),
  ((3, 3, 3), (1, 2, 2), ((1, 1), (1, 1), (1, 1))),
  ((3, 1, 2), (1, 1, 1), ((2, 0), (0, 0), (1, 0))),
  ((1, 1, 1), (1, 1, 1), ((0, 0), (0, 0), (0, 0))),
]


@pytest.mark.parametrize("kernel, strides, padding", CASES)
def test_depth_taps_equal_nn_conv_values_and_gradients(kernel, strides, padding):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 9, 8, 3)).astype(np.float32))
  reference = nn.Conv(5, kernel, strides=strides, padding=padding)
  ours = Conv(5, kernel, strides=strides, padding=padding, impl="depth_taps")
  variables = reference.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
    jnp.shape, variables
  )

  def loss(module, v, x):
    return jnp.sum(jnp.sin(module.apply(v, x)))

  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=1e-5)
  grads = jax.grad(loss, argnums=(1, 2))
  for a, b in zip(
    jax.tree.leaves(grads(ours, variables, x)), jax.tree.leaves(grads(reference, variables, x))
  ):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_auto_takes_depth_taps_on_cpu_only_where_it_applies():
  on_cpu = jax.default_backend() == "cpu"
  assert use_depth_taps("auto", (3, 3, 3), (1, 1, 1)) == on_cpu
  assert not use_depth_taps("auto", (3, 3, 3), (2, 2, 2))
  assert not use_depth_taps("auto", (3, 3), (1, 1))
  assert not use_depth_taps("native", (3, 3, 3), (1, 1, 1))
  with pytest.raises(ValueError, match="depth stride of 1"):
    use_depth_taps("depth_taps", (3, 3, 3), (2, 1, 1))
  with pytest.raises(ValueError, match="impl='fast'"):
    use_depth_taps("fast", (3, 3, 3), (1, 1, 1))


def test_transposed_stride2_without_bias_equals_nn_conv_transpose_with_flipped_kernel():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 5, 6)).astype(np.float32))
  ours = TransposedConvStride2(4, use_bias=False)
  variables = ours.init(jax.random.key(0), x)
  assert set(variables["params"]) == {"kernel"}
  kernel = nn.unbox(variables["params"]["kernel"])
  reference = nn.ConvTranspose(4, (2, 2, 2), strides=(2, 2, 2), padding="VALID", use_bias=False)
  flipped = {"params": {"kernel": kernel[::-1, ::-1, ::-1]}}
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(flipped, x), atol=1e-5)
