"""The ViT as an N-d encoder (UNETR, masked autoencoders): any channel count, per-axis sizes,
sin-cos position tables in MONAI's and SelfMedMAE's axis orders, attention without query/key/value
biases, every block's output, remat, and the token axis sharded over devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import AxisType

from mammojax.nn.vit import VisionTransformer, sincos_position_embedding

SMALL_3D = dict(
  image_size=(32, 32, 16),
  patch_size=8,
  hidden_dim=24,
  depth=3,
  num_heads=2,
  mlp_dim=32,
  class_token=False,
  repeat_grayscale=False,
  layer_norm_epsilon=1e-5,
)


def _volume(shape=(2, 32, 32, 16, 3), seed=0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_sincos_tables_match_monai_and_selfmedmae_orders():
  torch = pytest.importorskip("torch")
  pytest.importorskip("monai")
  from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

  for grid, dim in (((3, 4, 5), 48), ((6, 7), 32)):
    ours = sincos_position_embedding(grid, dim, "sincos_whd")
    with torch.no_grad():
      monai = build_sincos_position_embedding(list(grid), dim, spatial_dims=len(grid)).numpy()
    np.testing.assert_allclose(ours, monai, atol=1e-6)
  # SelfMedMAE: the first grid axis owns the first frequency block. With a grid that varies only
  # along axis 0, its sin block is the leading one in hwd and the second one in whd.
  hwd = sincos_position_embedding((4, 1, 1), 12, "sincos_hwd")[0]
  whd = sincos_position_embedding((4, 1, 1), 12, "sincos_whd")[0]
  positions = np.arange(4, dtype=np.float32)[:, None] * np.array([1.0, 0.01], np.float32)
  np.testing.assert_allclose(hwd[:, :2], np.sin(positions), atol=1e-6)
  np.testing.assert_allclose(whd[:, 4:6], np.sin(positions), atol=1e-6)


def test_sincos_table_errors_name_the_fix():
  with pytest.raises(ValueError, match="multiple of 6"):
    sincos_position_embedding((2, 2, 2), 16)
  with pytest.raises(ValueError, match="sincos_hwd"):
    sincos_position_embedding((2, 2, 2, 2), 48)


def test_volume_encoder_tokens_hidden_states_and_parameters():
  model = VisionTransformer(**SMALL_3D, qkv_bias=False, position_embedding="sincos_hwd")
  volume = _volume()
  variables = model.init(jax.random.key(0), volume)
  params = traverse_util.flatten_dict(nn.unbox(variables["params"]), sep="/")
  assert params["conv_proj/kernel"].shape == (8, 8, 8, 3, 24)  # 3 channels, not repeated
  assert "pos_embedding" not in params  # a fixed table is not a parameter
  assert "encoder_layer_0/attn/query/bias" not in params
  assert params["encoder_layer_0/attn/out/bias"].shape == (24,)
  tokens, hidden = model.apply(variables, volume, return_tokens=True)
  assert tokens.shape == (2, 4 * 4 * 2, 24) and len(hidden) == 3
  # The returned tokens are the LayerNorm of the last block's output.
  assert not np.allclose(tokens, hidden[-1])
  centred = np.asarray(tokens) - np.asarray(tokens).mean(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(tokens), centred, atol=1e-5)  # zero mean per token


def test_remat_gives_the_same_values_and_gradients():
  volume = _volume()
  plain = VisionTransformer(**SMALL_3D)
  variables = plain.init(jax.random.key(1), volume)
  remat = VisionTransformer(**SMALL_3D, remat=True)

  def loss(model, params):
    return jnp.sum(model.apply({"params": params}, volume) ** 2)

  value, grads = jax.value_and_grad(lambda p: loss(plain, p))(variables["params"])
  value_remat, grads_remat = jax.value_and_grad(lambda p: loss(remat, p))(variables["params"])
  np.testing.assert_allclose(value, value_remat, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_size_and_channel_errors():
  model = VisionTransformer(**SMALL_3D)
  with pytest.raises(ValueError, match="multiples of patch_size=8"):
    model.init(jax.random.key(0), _volume((1, 30, 32, 16, 3)))
  with pytest.raises(ValueError, match="3 sides"):
    model.init(jax.random.key(0), _volume((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="position_embedding"):
    VisionTransformer(**SMALL_3D, position_embedding="rope").init(jax.random.key(0), _volume())


def test_token_axis_shards_over_eight_devices_with_equal_outputs():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them")
  model = VisionTransformer(**SMALL_3D)
  volume = _volume((2, 32, 32, 16, 3))  # 32 tokens: 4 per device
  variables = nn.unbox(model.init(jax.random.key(2), volume))
  expected = model.apply(variables, volume, return_tokens=True)[0]
  mesh = jax.make_mesh(
    (1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8]
  )
  rules = (("batch", "data"), ("tokens", "model"))

  def run(params, images):
    with nn.logical_axis_rules(rules):
      return model.apply({"params": params}, images, return_tokens=True)[0]

  with jax.set_mesh(mesh):
    lowered = jax.jit(run).lower(variables["params"], volume)
    sharded = lowered.compile()(variables["params"], volume)
  # The constraint reaches the program: the token axis is split over the "model" mesh axis.
  constraints = [line for line in lowered.as_text().splitlines() if "sharding_constraint" in line]
  assert len(constraints) == SMALL_3D["depth"]
  assert all('[{"data"}, {"model"}, {}]' in line for line in constraints)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(expected), atol=1e-5)
