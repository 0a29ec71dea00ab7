"""torchvision ResNet-18/34/50: import, eval parity with torchvision, sown names, CLI."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mammojax.convert.__main__ import run
from mammojax.convert.resnet import import_resnet
from mammojax.nn.resnet import RESNET_INTERMEDIATE_NAMES, ResNet, resnet_feature_dim
from mammojax.train.variable_store import load_variables

torch = pytest.importorskip("torch")
from torch_refs.torchvision_import import import_torchvision  # noqa: E402

torchvision = import_torchvision()

SIZE = 64
NUM_CLASSES = 10


def _randomize_batch_norm(model, generator):
  """Random BN affine parameters; running statistics measured on a random batch, then perturbed.

  Independent random statistics (torch_refs' randomize_batch_norm) let eval-mode activations grow
  to ~1e3 in ResNet-34/50, and even with measured ones the float32 rounding of torch itself
  (against a float64 run) reaches 3e-4 on ResNet-50's pooled features. So, as in a trained
  network (or torchvision's zero_init_residual), each residual branch ends in a BN with a small
  scale (0.3 x): torch's own float32 error is then ~1e-5, leaving room for the 1e-4 parity bound.
  The measured statistics (a train-mode pass with a cumulative average) are then perturbed, each
  mean by 0.1 std and each variance by 0.8-1.2 x, so that they are not the batch's statistics.
  """
  blocks = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
  branch_ends = {
    id(block.bn3 if hasattr(block, "bn3") else block.bn2)
    for block in model.modules()
    if isinstance(block, blocks)
  }
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in norms:
      scale = 1 + 0.2 * torch.randn(m.num_features, generator=generator)
      m.weight.copy_(scale * (0.3 if id(m) in branch_ends else 1.0))
      m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
      m.reset_running_stats()
      m.momentum = None  # cumulative average: one batch -> exactly its statistics
    model.train()
    model(torch.randn(4, 3, SIZE, SIZE, generator=generator))
    for m in norms:
      m.momentum = 0.1
      shift = 0.1 * m.running_var.sqrt() * torch.randn(m.num_features, generator=generator)
      m.running_mean.add_(shift)
      m.running_var.mul_(0.8 + 0.4 * torch.rand(m.num_features, generator=generator))
      m.num_batches_tracked.fill_(7)
  return model.eval()


def _torch_resnet(depth: int, seed: int = 0, num_classes: int = NUM_CLASSES):
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # a non-zero classifier bias, so that its import is checked too
    model.fc.bias.normal_(0.0, 0.5, generator=generator)
  return _randomize_batch_norm(model, generator)


def _state(model, prefix: str = "") -> dict[str, np.ndarray]:
  return {f"{prefix}{k}": v.numpy() for k, v in model.state_dict().items()}


def _images(channels: int = 3, seed: int = 0) -> np.ndarray:
  """``[2, SIZE, SIZE, channels]``."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(2, SIZE, SIZE, channels)).astype(np.float32)


def _torch_forward(model, images: np.ndarray) -> dict[str, np.ndarray]:
  """Logits and each stage's output (NHWC), via forward hooks on torchvision's modules."""
  outputs = {}

  def hook(name):
    def record(module, inputs, output):
      del module, inputs
      outputs[name] = output.detach().numpy()

    return record

  handles = [getattr(model, name).register_forward_hook(hook(name)) for name in ("relu", "layer3")]
  handles.append(model.avgpool.register_forward_hook(hook("avgpool")))
  try:
    with torch.no_grad():
      logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  finally:
    for handle in handles:
      handle.remove()
  return {
    "logits": logits,
    "relu": outputs["relu"].transpose(0, 2, 3, 1),  # the stem's (only) call of model.relu
    "layer3": outputs["layer3"].transpose(0, 2, 3, 1),
    "avgpool": outputs["avgpool"][:, :, 0, 0],
  }


def _apply(model: ResNet, variables, images):
  out, state = model.apply(
    variables, jnp.asarray(images), use_running_average=True, mutable=["intermediates"]
  )
  sown = {name: np.asarray(value[0]) for name, value in state["intermediates"].items()}
  return np.asarray(out), sown


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.cache
def _parity_case(depth: int):
  """(torch model, imported variables, fields, consumed keys, torch outputs, ours, our sown)."""
  model_t = _torch_resnet(depth)
  variables, fields, consumed = import_resnet(_state(model_t))
  images = _images()
  expected = _torch_forward(model_t, images)
  logits, sown = _apply(ResNet(**fields), variables, images)
  return model_t, variables, fields, consumed, expected, logits, sown


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_eval_parity_with_torchvision(depth):
  model_t, variables, fields, consumed, expected, logits, sown = _parity_case(depth)
  assert fields == {"depth": depth, "base_width": 64, "num_classes": NUM_CLASSES}
  assert consumed == set(model_t.state_dict())
  logits_diff = _max_diff(logits, expected["logits"])
  features_diff = _max_diff(sown["avgpool"], expected["avgpool"])
  print(f"ResNet-{depth}: max |logits diff| {logits_diff:.2e}, |features diff| {features_diff:.2e}")
  assert logits_diff <= 1e-4
  assert features_diff <= 1e-4
  assert _max_diff(sown["layer3"], expected["layer3"]) <= 1e-4
  assert _max_diff(sown["relu"], expected["relu"]) <= 1e-4


def test_without_classifier_returns_the_pooled_features():
  """num_classes=0 on ResNet-50's weights minus fc (ResNet-18: the prefixed-dict test)."""
  _, variables, _, _, expected, _, _ = _parity_case(50)
  features_only = {
    "params": {k: v for k, v in variables["params"].items() if k != "fc"},
    "batch_stats": variables["batch_stats"],
  }
  features = ResNet(depth=50).apply(features_only, _images(), use_running_average=True)
  assert features.shape == (2, resnet_feature_dim(50)) == (2, 2048)
  assert _max_diff(features, expected["avgpool"]) <= 1e-4


def test_sown_intermediates_have_torchvision_names_and_shapes():
  model_t, _, _, _, expected, _, sown = _parity_case(50)
  assert tuple(sown) == RESNET_INTERMEDIATE_NAMES
  shapes = {name: value.shape for name, value in sown.items()}
  assert shapes == {
    "relu": (2, 32, 32, 64),
    "maxpool": (2, 16, 16, 64),
    "layer1": (2, 16, 16, 256),
    "layer2": (2, 8, 8, 512),
    "layer3": (2, 4, 4, 1024),
    "layer4": (2, 2, 2, 2048),
    "avgpool": (2, 2048),
  }
  assert sown["layer3"].shape == expected["layer3"].shape  # the forward hook on model.layer3
  for name in RESNET_INTERMEDIATE_NAMES[:-1]:  # each is a torchvision module of that name
    assert isinstance(getattr(model_t, name), torch.nn.Module)


def test_structure_and_param_names():
  model = ResNet(depth=34, base_width=8, num_classes=3)
  variables = nn.meta.unbox(
    jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), use_running_average=True)
    )
  )
  params = variables["params"]
  blocks = [f"layer{s}_{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]
  assert sorted(params) == sorted(["conv1", "bn1", "fc", *blocks])
  projected = sorted(name for name, block in params.items() if "downsample_conv" in block)
  assert projected == ["layer2_0", "layer3_0", "layer4_0"]
  assert params["fc"]["kernel"].shape == (64, 3)
  bottleneck = nn.meta.unbox(
    jax.eval_shape(
      lambda: ResNet(depth=50, base_width=8).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True
      )
    )
  )["params"]
  assert sorted(bottleneck["layer1_0"]) == [
    "bn1",
    "bn2",
    "bn3",
    "conv1",
    "conv2",
    "conv3",
    "downsample_bn",
    "downsample_conv",
  ]
  assert "downsample_conv" not in bottleneck["layer1_1"]
  assert resnet_feature_dim(50, 8) == 256 and resnet_feature_dim(18) == 512


def test_bfloat16_computation_and_injected_activation():
  calls = []

  def counting_relu(x):
    calls.append(x.shape)
    return nn.relu(x)

  model = ResNet(
    depth=18, base_width=8, num_classes=3, dtype=jnp.bfloat16, activation=counting_relu
  )
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), images, use_running_average=True)
  )
  del calls[:]
  assert {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(variables))} == {
    np.dtype(np.float32)
  }
  out = jax.eval_shape(lambda v: model.apply(v, images, use_running_average=True), variables)
  assert out.shape == (1, 3) and out.dtype == jnp.bfloat16
  assert len(calls) == 1 + 2 * 8  # the stem's ReLU, then two per basic block


def test_grayscale_equals_repeated_channels_and_bad_shapes_are_named():
  model = ResNet(depth=18, base_width=8, num_classes=4)
  gray = _images(channels=1)
  # Random numpy variables of init's shapes: init itself compiles an initializer per shape.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda leaf: 0.5 + 0.1 * rng.normal(size=leaf.shape).astype(np.float32),
    nn.meta.unbox(
      jax.eval_shape(lambda: model.init(jax.random.key(0), gray, use_running_average=True))
    ),
  )
  np.testing.assert_array_equal(
    model.apply(variables, gray, use_running_average=True),
    model.apply(variables, np.repeat(gray, 3, axis=-1), use_running_average=True),
  )
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    model.apply(variables, np.zeros((1, 32, 32, 2), np.float32), use_running_average=True)
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    model.apply(variables, np.zeros((32, 32, 3), np.float32), use_running_average=True)


def test_unsupported_depth_lists_the_supported_ones():
  with pytest.raises(ValueError, match=r"depth 101.*\[18, 34, 50\]"):
    ResNet(depth=101).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True)
  with pytest.raises(ValueError, match=r"\[18, 34, 50\]"):
    resnet_feature_dim(152)


def test_prefixed_headless_state_dict_and_foreign_keys():
  model_t = _torch_resnet(18, num_classes=5)
  state = _state(model_t, prefix="backbone.")
  del state["backbone.fc.weight"], state["backbone.fc.bias"]
  state["head.weight"] = np.zeros((2, 512), np.float32)
  variables, fields, consumed = import_resnet(state)
  assert fields == {"depth": 18, "base_width": 64, "num_classes": 0}
  assert set(state) - consumed == {"head.weight"}
  assert "fc" not in variables["params"]
  features = ResNet(**fields).apply(variables, _images(), use_running_average=True)
  assert _max_diff(features, _torch_forward(model_t, _images())["avgpool"]) <= 1e-4


def test_bad_state_dicts_are_named():
  state = _state(_torch_resnet(18))
  with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight.*found none"):
    import_resnet({"encoder.0.conv1.weight": state["conv1.weight"]})
  with pytest.raises(ValueError, match=r"several"):
    import_resnet({**state, **{f"other.{k}": v for k, v in state.items()}})
  extra = dict(state, **{"layer5.0.conv1.weight": state["layer4.0.conv1.weight"]})
  with pytest.raises(ValueError, match=r"not part of it.*layer5\.0\.conv1\.weight"):
    import_resnet(extra)
  missing = {k: v for k, v in state.items() if k != "layer2.0.downsample.1.running_var"}
  with pytest.raises(ValueError, match=r"'layer2\.0\.downsample\.1\.running_var' missing"):
    import_resnet(missing)
  wrong = dict(state, **{"layer3.1.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)})
  with pytest.raises(
    ValueError, match=r"'layer3\.1\.conv2\.weight' has shape .*\(256, 256, 3, 3\)"
  ):
    import_resnet(wrong)
  fewer = {k: v for k, v in state.items() if not k.startswith("layer3.1.")}
  with pytest.raises(ValueError, match=r"\(2, 2, 1, 2\) basic blocks.*ResNet-18"):
    import_resnet(fewer)


def test_cli_round_trip(tmp_path):
  model_t = _torch_resnet(18, seed=3)
  path = tmp_path / "r18.pt"
  torch.save(model_t.state_dict(), path)
  assert run(["resnet", str(path), f"--out={tmp_path / 'out'}"]) == 0
  source = json.loads((tmp_path / "out" / "source.json").read_text())
  assert source["kind"] == "resnet"
  assert source["model_fields"] == {"depth": 18, "base_width": 64, "num_classes": NUM_CLASSES}
  assert source["skipped_keys"] == []
  images = _images(seed=3)
  ours = ResNet(**source["model_fields"]).apply(
    load_variables(str(tmp_path / "out")), images, use_running_average=True
  )
  assert _max_diff(ours, _torch_forward(model_t, images)["logits"]) <= 1e-4


def test_cli_names_a_non_resnet_file(tmp_path, capsys):
  path = tmp_path / "other.pt"
  torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
  assert run(["resnet", str(path), f"--out={tmp_path / 'out'}"]) == 1
  assert "layer1.0.conv1.weight" in capsys.readouterr().err
