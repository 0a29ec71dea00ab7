"""Mirai ResNet-18 trunk: structure, torch parity (eval and train BN), checkpoint import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mammojax.convert.mirai import find_backbone, import_mirai
from mammojax.nn.resnet import INTERMEDIATE_NAMES, MiraiResNet18

torch = pytest.importorskip("torch")
from torch_refs.resnet_torch import ResNet18Trunk, randomize_batch_norm  # noqa: E402

WIDTH = 8


def _torch_trunk(seed=0):
  generator = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  model = ResNet18Trunk(WIDTH)
  randomize_batch_norm(model, generator)
  return model.eval()


def _mirai_snapshot_state(model):
  """As the released snapshot: DataParallel(CustomResnet) keys plus non-backbone heads."""
  state = {f"module._model.{k}": v.numpy() for k, v in model.state_dict().items()}
  state["module._model.fc.weight"] = np.zeros((2, 8 * WIDTH), np.float32)
  state["module._model.prob_of_failure_layer.hazard_fc.weight"] = np.zeros((5, 8 * WIDTH))
  return state


def test_structure_and_shapes():
  model = MiraiResNet18(base_width=WIDTH)
  images = jnp.zeros((1, 70, 50, 1))
  variables = nn.meta.unbox(
    jax.eval_shape(lambda: model.init(jax.random.key(0), images, use_running_average=True))
  )
  params = variables["params"]
  projected = sorted(name for name, block in params.items() if "downsample_conv" in block)
  assert projected == ["layer2_0", "layer3_0", "layer4_0"]
  assert sorted(params) == ["downsampler"] + [f"layer{i}_{j}" for i in range(1, 5) for j in (0, 1)]
  assert params["downsampler"]["conv1"]["kernel"].shape == (7, 7, 3, WIDTH)
  out = jax.eval_shape(lambda v: model.apply(v, images, use_running_average=True), variables)
  assert out.shape == (1, 3, 2, 8 * WIDTH)  # ceil(70 / 32), ceil(50 / 32)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    MiraiResNet18(base_width=WIDTH).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 2)), use_running_average=True
    )


def test_eval_parity_with_torch_from_mirai_layout():
  model_t = _torch_trunk()
  state = _mirai_snapshot_state(model_t)
  prefixes, layout = find_backbone(state)
  assert "module._model." in layout
  variables = import_mirai(state)
  rng = np.random.default_rng(0)
  gray = rng.normal(size=(2, 1, 96, 64)).astype(np.float32)
  with torch.no_grad():
    expected = model_t(torch.from_numpy(gray).expand(-1, 3, -1, -1)).numpy()
  ours = MiraiResNet18(base_width=WIDTH).apply(
    variables, jnp.asarray(gray.transpose(0, 2, 3, 1)), use_running_average=True
  )
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_train_mode_batch_norm_matches_torch():
  model_t = _torch_trunk(seed=1).train()
  variables = import_mirai({k: v.numpy() for k, v in model_t.state_dict().items()})
  rng = np.random.default_rng(1)
  rgb = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    expected = model_t(torch.from_numpy(rgb)).numpy()
  ours, updated = MiraiResNet18(base_width=WIDTH).apply(
    variables,
    jnp.asarray(rgb.transpose(0, 2, 3, 1)),
    use_running_average=False,
    mutable=["batch_stats"],
  )
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)
  # torch momentum 0.1 == flax momentum 0.9 (running means; torch's running var uses the
  # unbiased batch variance, flax the biased one, so only means are compared exactly).
  np.testing.assert_allclose(
    np.asarray(updated["batch_stats"]["layer3_0"]["bn1"]["mean"]),
    model_t.layer3_0.bn1.running_mean.numpy(),
    atol=1e-5,
  )


def test_missing_backbone_key_is_named():
  state = {k: v.numpy() for k, v in _torch_trunk().state_dict().items()}
  del state["layer3_1.bn2.running_var"]
  with pytest.raises(KeyError, match="layer3_1.bn2.running_var"):
    import_mirai(state)
  with pytest.raises(ValueError, match="no unique Mirai ResNet-18 backbone"):
    import_mirai({"fc.weight": np.zeros((2, 2))})


def test_stage_outputs_are_sown_only_when_asked():
  model = MiraiResNet18(base_width=WIDTH)
  images = jnp.zeros((2, 64, 48, 1))
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), images, use_running_average=True)
  )
  out, state = jax.eval_shape(
    lambda v: model.apply(v, images, use_running_average=True, mutable=["intermediates"]),
    variables,
  )
  sown = {name: value[0].shape for name, value in state["intermediates"].items()}
  assert sown == {
    "stem": (2, 16, 12, WIDTH),
    "layer1": (2, 16, 12, WIDTH),
    "layer2": (2, 8, 6, 2 * WIDTH),
    "layer3": (2, 4, 3, 4 * WIDTH),
    "layer4": (2, 2, 2, 8 * WIDTH),
  }
  assert sown["layer4"] == out.shape
  assert set(sown) == set(INTERMEDIATE_NAMES)
  # Without the collection the call returns the feature map alone, as before.
  plain = jax.eval_shape(lambda v: model.apply(v, images, use_running_average=True), variables)
  assert plain.shape == out.shape


def test_activation_is_injectable():
  model = MiraiResNet18(base_width=WIDTH)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 1)), jnp.float32)
  variables = model.init(jax.random.key(0), images, use_running_average=True)
  relu = model.apply(variables, images, use_running_average=True)
  swapped = MiraiResNet18(base_width=WIDTH, activation=jax.nn.relu6).apply(
    variables, images, use_running_average=True
  )
  assert swapped.shape == relu.shape
  assert not np.allclose(np.asarray(swapped), np.asarray(relu))
