"""EfficientNet-B2 (Mammo-CLIP layout): torch parity, static vs dynamic SAME padding, import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.convert.mammoclip import import_efficientnet
from mammojax.nn.efficientnet import MAMMOCLIP_STATIC_SIZE, EfficientNet, block_specs, same_padding

torch = pytest.importorskip("torch")
from torch_refs.efficientnet_torch import TorchEfficientNet, randomize_batch_norm  # noqa: E402

# A small EfficientNet (2-8 channels per stage, 10 blocks) for the training-mode checks.
TINY = dict(width=0.25, depth=0.34)


def _torch_net(seed=0, **kwargs):
  torch.manual_seed(seed)
  net = TorchEfficientNet(**kwargs)
  randomize_batch_norm(net, torch.Generator().manual_seed(seed))
  return net


def _mammoclip_state(net):
  return {"image_encoder." + k: v for k, v in net.state_dict().items()}


def _torch_maps(net, images):
  with torch.no_grad():
    maps = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    return [m.permute(0, 2, 3, 1).numpy() for m in maps]


def _jax_maps(model, variables, images):
  out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(images))
  keys = ["stride_16", "stride_32"] + (["head"] if model.include_head else [])
  return [np.asarray(out[k]) for k in keys]


@pytest.fixture(scope="module")
def b2():
  """Torch B2 with head, static padding for 260, and its weights imported into Flax."""
  net = _torch_net(static_size=MAMMOCLIP_STATIC_SIZE, include_head=True).eval()
  model = EfficientNet(static_padding_size=MAMMOCLIP_STATIC_SIZE, include_head=True)
  return net, model, import_efficientnet(_mammoclip_state(net), model)


def test_b2_layout():
  specs = block_specs(1.1, 1.2)
  assert len(specs) == 23
  model = EfficientNet()
  assert model.stride16_index == 15
  assert (model.stride16_channels, model.stride32_channels) == (120, 352)
  assert [s.out_filters for s in specs if s.stride == 2] == [24, 48, 88, 208]


def test_same_padding():
  # TF SAME: output ceil(n / s); the extra pixel goes after.
  assert same_padding(260, 3, 2) == (0, 1)
  assert same_padding(65, 5, 2) == (2, 2)
  assert same_padding(32, 5, 2) == (1, 2)
  assert same_padding(17, 5, 1) == (2, 2)


def test_static_padding_parity_with_head(b2):
  net, model, variables = b2
  images = np.random.RandomState(0).randn(1, 128, 128, 3).astype(np.float32)
  ours = _jax_maps(model, variables, images)
  ref = _torch_maps(net, images)
  assert [o.shape for o in ours] == [(1, 8, 8, 120), (1, 4, 4, 352), (1, 4, 4, 1408)]
  for o, r in zip(ours, ref):
    np.testing.assert_allclose(o, r, atol=1e-4, rtol=1e-4)


def test_dynamic_padding_parity_and_static_differs(b2):
  net, _, variables = b2
  images = np.random.RandomState(1).randn(1, 100, 76, 3).astype(np.float32)
  dynamic = EfficientNet(static_padding_size=None)
  dyn = _jax_maps(
    dynamic, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, images
  )
  dynamic_net = TorchEfficientNet(include_head=True).eval()
  dynamic_net.load_state_dict(net.state_dict())
  ref = _torch_maps(dynamic_net, images)
  for o, r in zip(dyn, ref[:2]):
    np.testing.assert_allclose(o, r, atol=1e-4, rtol=1e-4)
  # At 100x76 the stride-2 3x3 conv of stage 4 sees width 10: dynamic pads (0, 1), padding
  # computed for 260 (width 33 there) pads (1, 1). Same shapes, different maps.
  static = _jax_maps(EfficientNet(static_padding_size=MAMMOCLIP_STATIC_SIZE), variables, images)
  assert static[0].shape == dyn[0].shape == (1, 7, 5, 120)
  np.testing.assert_allclose(static[0], _torch_maps(net, images)[0], atol=1e-5, rtol=1e-5)
  assert not np.allclose(static[0], dyn[0], atol=1e-4, rtol=1e-4)


def test_train_mode_matches_torch_and_updates_stats():
  net = _torch_net(drop_connect_rate=0.0, **TINY).train()
  model = EfficientNet(drop_connect_rate=0.0, **TINY)
  variables = import_efficientnet(_mammoclip_state(net), model)
  images = np.random.RandomState(2).randn(2, 64, 64, 3).astype(np.float32)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
    variables, jnp.asarray(images)
  )
  ref = _torch_maps(net, images)
  np.testing.assert_allclose(np.asarray(out["stride_32"]), ref[1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["stride_16"]), ref[0], atol=1e-4, rtol=1e-4)
  old = variables["batch_stats"]["bn0"]["mean"]
  new = np.asarray(updates["batch_stats"]["bn0"]["mean"])
  assert not np.allclose(old, new)


def test_drop_connect_only_in_training():
  model = EfficientNet(drop_connect_rate=0.9, **TINY)
  images = jnp.asarray(np.random.RandomState(3).randn(4, 32, 32, 3), jnp.float32)
  variables = import_efficientnet(_mammoclip_state(_torch_net(**TINY)), model)
  evaluate = jax.jit(lambda v, x: model.apply(v, x)["stride_32"])
  np.testing.assert_array_equal(evaluate(variables, images), evaluate(variables, images))
  train = jax.jit(
    lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[
      0
    ]["stride_32"]
  )
  runs = [np.asarray(train(variables, images, jax.random.key(k))) for k in (1, 2)]
  assert np.abs(runs[0] - runs[1]).max() > 1e-3
  with pytest.raises(Exception, match="dropout"):
    jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)


def test_import_reports_missing_unexpected_and_shapes(b2):
  net, _, _ = b2
  state = _mammoclip_state(net)
  state.pop("image_encoder._blocks.3._bn1.running_var")
  state["image_encoder._blocks.99._bn1.weight"] = np.zeros(3, np.float32)
  state["image_encoder._bn0.weight"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError) as err:
    import_efficientnet(state, EfficientNet(static_padding_size=MAMMOCLIP_STATIC_SIZE))
  message = str(err.value)
  assert "_blocks.3._bn1.running_var" in message
  assert "_blocks.99._bn1.weight" in message
  assert "_bn0.weight: checkpoint (7,)" in message
  with pytest.raises(ValueError, match="prefix"):
    import_efficientnet({"text_encoder.x": np.zeros(1)})


def test_rejects_non_image_input():
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    EfficientNet(**TINY).init(jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_feature_maps_are_sown_under_module_names():
  model = EfficientNet(**TINY, include_head=True)
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  out, state = jax.eval_shape(
    lambda v: model.apply(v, images, mutable=["intermediates"]), variables
  )
  sown = state["intermediates"]
  num_blocks = len(model.blocks)
  assert set(sown) == {"stem", "head"} | {f"blocks_{i}" for i in range(num_blocks)}
  assert set(sown) - {"stem", "head"} <= set(variables["params"])
  assert sown["stem"][0].shape[1:3] == (32, 32)
  assert sown[f"blocks_{model.stride16_index}"]["output"][0].shape == out["stride_16"].shape
  assert sown[f"blocks_{num_blocks - 1}"]["output"][0].shape == out["stride_32"].shape
  assert sown["head"][0].shape == out["head"].shape
