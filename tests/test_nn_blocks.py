"""Shared layers of mammojax.nn: conv blocks (2D / 3D), resampling, the transformer block, torch
weight layouts, initialisers, logical axes and sown intermediates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mammojax.convert import layouts
from mammojax.models.registration.mammoregnet import ConvBlock, leaky_relu_0_2
from mammojax.nn import initializers, partitioning
from mammojax.nn.conv_blocks import ConvNormAct, TransposedConvStride2, instance_norm
from mammojax.nn.fpn import FPN
from mammojax.nn.resize import (
  avg_pool_half,
  downsample,
  resize_linear_align_corners,
  resize_nearest,
  upsample,
)
from mammojax.nn.transformer import TransformerBlock

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _random(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _channels_first(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _channels_last(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


# ----------------------------------------------------------------------------- conv blocks


@pytest.mark.parametrize("num_spatial_dims", [2, 3])
def test_instance_norm_against_numpy(num_spatial_dims):
  x = _random((2, *(5,) * num_spatial_dims, 3)) * 3.0 + 1.0
  axes = tuple(range(1, num_spatial_dims + 1))
  expected = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(instance_norm(jnp.asarray(x))), expected, atol=1e-5)


@pytest.mark.parametrize("num_spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_conv_norm_act_shapes_and_parameters(num_spatial_dims, norm):
  block = ConvNormAct(
    8, num_spatial_dims=num_spatial_dims, kernel_size=3, strides=2, norm=norm, num_groups=4
  )
  x = jnp.zeros((2, *(9,) * num_spatial_dims, 3))
  variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x))
  out = jax.eval_shape(
    lambda v: block.apply(v, x, train=norm == "batch", mutable=["batch_stats"]), variables
  )[0]
  assert out.shape == (2, *(5,) * num_spatial_dims, 8)
  params = variables["params"]
  kernel = params["conv"]["kernel"]
  assert kernel.value.shape == (3,) * num_spatial_dims + (3, 8)
  assert kernel.names == partitioning.conv_kernel_axes(num_spatial_dims)
  # A norm with its own shift replaces the conv bias.
  assert ("bias" in params["conv"]) == (norm in ("instance", "none"))
  assert ("norm" in params) == (norm in ("batch", "group"))


def test_conv_norm_act_rejects_wrong_rank_and_norm():
  with pytest.raises(ValueError, match="3 spatial axes"):
    ConvNormAct(4, num_spatial_dims=3).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="norm must be one of"):
    ConvNormAct(4, norm="layer").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_conv_norm_act_reproduces_mammoregnet_conv_block():
  x = jnp.asarray(_random((2, 8, 8, 3)))
  variables = ConvBlock(4).init(jax.random.key(0), x)
  step = ConvNormAct(
    4, norm="instance", activation=leaky_relu_0_2, activation_before_norm=True, use_bias=True
  )
  params = nn.meta.unbox(variables)["params"]
  y = step.apply({"params": {"conv": params["Conv_1"]}}, x)
  y = step.apply({"params": {"conv": params["Conv_2"]}}, y)
  np.testing.assert_array_equal(np.asarray(ConvBlock(4).apply(variables, x)), np.asarray(y))


@pytest.mark.parametrize("num_spatial_dims", [2, 3])
def test_transposed_conv_stride2_matches_torch(num_spatial_dims):
  x = _random((2, *(3,) * num_spatial_dims, 4))
  module = TransposedConvStride2(5)
  variables = nn.meta.unbox(module.init(jax.random.key(0), jnp.asarray(x)))
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  bias = np.asarray(_random((5,), seed=1))
  torch_weight = np.asarray(kernel).transpose(-2, -1, *range(num_spatial_dims))  # [I, O, *k]
  conv_transpose = F.conv_transpose2d if num_spatial_dims == 2 else F.conv_transpose3d
  expected = conv_transpose(
    _channels_first(x), torch.from_numpy(torch_weight.copy()), torch.from_numpy(bias), stride=2
  )
  np.testing.assert_allclose(
    layouts.torch_transposed_conv_kernel(torch_weight), np.asarray(kernel), atol=0
  )
  ours = module.apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(ours), _channels_last(expected), atol=1e-5)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize(
  ("shape", "size", "mode"),
  [((2, 5, 7, 3), (9, 4), "bilinear"), ((1, 4, 5, 3, 2), (7, 2, 6), "trilinear")],
)
def test_resize_linear_align_corners_matches_torch(shape, size, mode):
  x = _random(shape)
  expected = _channels_last(
    F.interpolate(_channels_first(x), size=size, mode=mode, align_corners=True)
  )
  ours = resize_linear_align_corners(jnp.asarray(x), size)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-6)
  # The numpy path computes the same float32 values on the host.
  on_host = resize_linear_align_corners(x, size)
  assert isinstance(on_host, np.ndarray) and on_host.dtype == np.float32
  np.testing.assert_array_equal(on_host, np.asarray(ours))


def test_resize_linear_align_corners_axes_and_float64():
  maps = np.random.default_rng(0).random((3, 4, 6))
  out = resize_linear_align_corners(maps, (7, 11), axes=(1, 2))
  assert out.dtype == np.float64 and out.shape == (3, 7, 11)
  np.testing.assert_allclose(out[:, [0, -1]][:, :, [0, -1]], maps[:, [0, -1]][:, :, [0, -1]])
  with pytest.raises(ValueError, match="one entry per resized axis"):
    resize_linear_align_corners(maps, (7,), axes=(1, 2))


@pytest.mark.parametrize(("height", "size"), [(28, 17), (8, 28), (28, 64)])
def test_scipy_zoom_order1_is_linear_align_corners(height, size):
  """``mammojax.data.digits`` resizes with ``ndimage.zoom(order=1)``: the same resampling, but
  scipy sums the 2D corners in one float64 expression, so float32 results differ by 1 ulp in
  about 0.1% of pixels; the data pipeline keeps scipy to stay bit-identical."""
  ndimage = pytest.importorskip("scipy.ndimage")
  images = np.random.default_rng(0).random((5, height, height)).astype(np.float32)
  expected = ndimage.zoom(images, (1, size / height, size / height), order=1)
  ours = resize_linear_align_corners(images.astype(np.float64), (size, size)).astype(np.float32)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1.2e-7)


@pytest.mark.parametrize(("shape", "size"), [((2, 3, 5, 2), (7, 4)), ((1, 2, 3, 4, 2), (5, 3, 9))])
def test_resize_nearest_matches_torch(shape, size):
  x = _random(shape)
  expected = _channels_last(F.interpolate(_channels_first(x), size=size, mode="nearest"))
  np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(x), size)), expected)


@pytest.mark.parametrize("num_spatial_dims", [2, 3])
def test_upsample_matches_torch(num_spatial_dims):
  x = _random((2, *(3,) * num_spatial_dims, 2))
  linear = "bilinear" if num_spatial_dims == 2 else "trilinear"
  for ours_method, torch_mode in (("nearest", "nearest"), ("linear", linear)):
    kwargs = {} if torch_mode == "nearest" else {"align_corners": False}
    expected = F.interpolate(_channels_first(x), scale_factor=2, mode=torch_mode, **kwargs)
    ours = upsample(jnp.asarray(x), 2, ours_method)
    np.testing.assert_allclose(np.asarray(ours), _channels_last(expected), atol=1e-6)


@pytest.mark.parametrize("num_spatial_dims", [2, 3])
def test_downsample_matches_torch(num_spatial_dims):
  x = _random((2, *(5,) * num_spatial_dims, 2))
  pools = {
    "avg": F.avg_pool2d if num_spatial_dims == 2 else F.avg_pool3d,
    "max": F.max_pool2d if num_spatial_dims == 2 else F.max_pool3d,
  }
  for method, pool in pools.items():
    expected = _channels_last(pool(_channels_first(x), 2))
    ours = downsample(jnp.asarray(x), 2, method)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-6)
  expected = _channels_last(pools["max"](_channels_first(x), kernel_size=1, stride=2))
  np.testing.assert_array_equal(np.asarray(downsample(jnp.asarray(x), 2, "subsample")), expected)
  half = avg_pool_half(jnp.asarray(x))
  avg = F.avg_pool2d if num_spatial_dims == 2 else F.avg_pool3d
  expected = _channels_last(avg(_channels_first(x), 2, ceil_mode=True))
  np.testing.assert_allclose(np.asarray(half), expected, atol=1e-6)


# ----------------------------------------------------------------------------- transformer


def _torch_encoder_layer_params(layer, num_heads):
  """torch ``nn.TransformerEncoderLayer`` weights -> TransformerBlock params."""
  state = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
  dim = state["linear2.weight"].shape[0]
  head_dim = dim // num_heads
  attn = {}
  for index, name in enumerate(("query", "key", "value")):
    rows = slice(index * dim, (index + 1) * dim)
    attn[name] = {
      "kernel": layouts.torch_dense_kernel(state["self_attn.in_proj_weight"][rows]).reshape(
        dim, num_heads, head_dim
      ),
      "bias": state["self_attn.in_proj_bias"][rows].reshape(num_heads, head_dim),
    }
  attn["out"] = {
    "kernel": layouts.torch_dense_kernel(state["self_attn.out_proj.weight"]).reshape(
      num_heads, head_dim, dim
    ),
    "bias": state["self_attn.out_proj.bias"],
  }

  def dense(name):
    return {
      "kernel": layouts.torch_dense_kernel(state[f"{name}.weight"]),
      "bias": state[f"{name}.bias"],
    }

  def norm(name):
    return {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}

  return {
    "attn": attn,
    "norm1": norm("norm1"),
    "norm2": norm("norm2"),
    "ff_in": dense("linear1"),
    "ff_out": dense("linear2"),
  }


@pytest.mark.parametrize("pre_norm", [True, False])
def test_transformer_block_matches_torch_encoder_layer(pre_norm):
  dim, heads, hidden = 16, 4, 24
  torch.manual_seed(0)
  layer = torch.nn.TransformerEncoderLayer(
    dim, heads, hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=pre_norm
  ).eval()
  tokens = _random((2, 5, dim)) + 2.0
  with torch.no_grad():
    expected = layer(torch.from_numpy(tokens)).numpy()
  block = TransformerBlock(num_heads=heads, mlp_dim=hidden, pre_norm=pre_norm)
  abstract = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.asarray(tokens), True))
  params = _torch_encoder_layer_params(layer, heads)
  # Same tree as a fresh init: the block's names and shapes are the torch layer's.
  assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(abstract)["params"])
  ours = block.apply({"params": params}, jnp.asarray(tokens), True)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_transformer_block_mask_dropout_and_axes():
  tokens = jnp.asarray(_random((2, 4, 8)))
  block = TransformerBlock(num_heads=2, mlp_ratio=2.0, dropout_rate=0.5, activation=nn.relu)
  variables = block.init(jax.random.key(0), tokens, True)
  assert variables["params"]["attn"]["query"]["kernel"].names == partitioning.ATTENTION_QKV_AXES
  assert variables["params"]["ff_in"]["kernel"].names == partitioning.DENSE_KERNEL_AXES
  assert nn.meta.unbox(variables)["params"]["ff_in"]["kernel"].shape == (8, 16)
  eval_a = block.apply(variables, tokens, True)
  np.testing.assert_array_equal(
    np.asarray(eval_a), np.asarray(block.apply(variables, tokens, True))
  )
  train = block.apply(variables, tokens, False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(np.asarray(train), np.asarray(eval_a))
  # Masking out a key token makes the other tokens independent of it.
  mask = jnp.ones((2, 1, 4, 4), bool).at[:, :, :, 3].set(False)
  changed = tokens.at[:, 3].add(5.0)
  np.testing.assert_allclose(
    np.asarray(block.apply(variables, tokens, True, mask)[:, :3]),
    np.asarray(block.apply(variables, changed, True, mask)[:, :3]),
    atol=1e-6,
  )
  with pytest.raises(ValueError, match=r"\[B, S, D\]"):
    block.init(jax.random.key(0), tokens[0], True)


# ----------------------------------------------------------------------------- layouts, inits


@pytest.mark.parametrize("num_spatial_dims", [1, 2, 3])
def test_torch_conv_kernel_layout_matches_torch_conv(num_spatial_dims):
  x = _random((2, *(6,) * num_spatial_dims, 3))
  weight = _random((4, 3, *(3,) * num_spatial_dims), seed=1)
  conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[num_spatial_dims]
  expected = _channels_last(conv(_channels_first(x), torch.from_numpy(weight), padding=1))
  kernel = layouts.torch_conv_kernel(weight)
  assert layouts.torch_conv_kernel_shape(kernel.shape) == weight.shape
  ours = nn.Conv(4, (3,) * num_spatial_dims, padding=1, use_bias=False).apply(
    {"params": {"kernel": kernel}}, jnp.asarray(x)
  )
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


@pytest.mark.parametrize("num_spatial_dims", [2, 3])
def test_flipped_transposed_kernel_for_flax_conv_transpose(num_spatial_dims):
  """ICON's up-convolutions: torch ConvTranspose(k=4, s=2, p=1) == Flax's, flipped, pad 2."""
  x = _random((1, *(3,) * num_spatial_dims, 2))
  weight = _random((2, 3, *(4,) * num_spatial_dims), seed=1)  # [I, O, *k]
  conv_t = F.conv_transpose2d if num_spatial_dims == 2 else F.conv_transpose3d
  expected = _channels_last(
    conv_t(_channels_first(x), torch.from_numpy(weight), stride=2, padding=1)
  )
  kernel = layouts.torch_transposed_conv_kernel(weight, flip=True)
  assert layouts.torch_transposed_conv_kernel_shape(kernel.shape) == weight.shape
  module = nn.ConvTranspose(
    3, (4,) * num_spatial_dims, strides=(2,) * num_spatial_dims,
    padding=((2, 2),) * num_spatial_dims, use_bias=False,
  )  # fmt: skip
  ours = module.apply({"params": {"kernel": kernel}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_dense_layout_and_errors():
  weight = _random((3, 5))
  np.testing.assert_array_equal(layouts.torch_dense_kernel(weight), weight.T)
  assert layouts.torch_dense_kernel_shape((5, 3)) == (3, 5)
  with pytest.raises(ValueError, match=r"\[out, in\]"):
    layouts.torch_dense_kernel(weight[0])
  with pytest.raises(ValueError, match=r"\[out, in, \*kernel\]"):
    layouts.torch_conv_kernel(weight)


def test_torch_default_initializers_have_torch_bounds():
  """uniform(+-1/sqrt(fan_in)); a transposed conv's fan-in counts its OUTPUT channels."""
  key = jax.random.key(0)
  dense = np.asarray(initializers.torch_default_kernel(key, (64, 32)))
  assert 0.95 / 8 < np.abs(dense).max() <= 1 / 8
  linear = torch.nn.Linear(64, 32).weight.detach().numpy()
  assert abs(dense.std() / linear.std() - 1.0) < 0.1
  transposed = np.asarray(initializers.torch_default_transposed_kernel(key, (2, 2, 8, 16)))
  bound = 1 / np.sqrt(16 * 2 * 2)
  assert 0.95 * bound < np.abs(transposed).max() <= bound
  he = np.asarray(initializers.he_fan_out_normal(key, (3, 3, 16, 64)))
  assert abs(he.std() / np.sqrt(2.0 / (3 * 3 * 64)) - 1.0) < 0.1


# ----------------------------------------------------------------------------- intermediates


def test_fpn_sows_its_levels():
  fpn = FPN(8)
  c4, c5 = jnp.zeros((1, 8, 6, 5)), jnp.zeros((1, 4, 3, 7))
  variables = jax.eval_shape(lambda: fpn.init(jax.random.key(0), c4, c5))
  out, state = jax.eval_shape(lambda v: fpn.apply(v, c4, c5, mutable=["intermediates"]), variables)
  sown = {name: value[0].shape for name, value in state["intermediates"].items()}
  assert sown == {f"stride_{s}": out[s].shape for s in (16, 32, 128)}
