"""MONAI U-Net blocks and BasicUNet against MONAI itself: eval parity with perturbed random
weights, the state-dict import (and its refusals), the size error and the ``unet3d`` CLI kind."""

import json

import jax
import numpy as np
import pytest

from mammojax.convert.__main__ import run
from mammojax.convert.basic_unet import (
  abstract_params,
  basic_unet_rule,
  convert_by_rules,
  import_basic_unet,
)
from mammojax.convert.unetr import conv_stage_rule
from mammojax.models.segmentation.basic_unet import BasicUNet, UpCat
from mammojax.nn.unet_blocks import (
  UnetBasicBlock,
  UnetOutBlock,
  UnetResBlock,
  UnetrPrUpBlock,
  UnetrUpBlock,
)
from mammojax.train.variable_store import load_variables

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")
from monai.networks.blocks import dynunet_block, unetr_block  # noqa: E402
from monai.networks.nets import basic_unet  # noqa: E402

# Max abs difference allowed, relative to max(1, the reference's largest magnitude).
TOLERANCE = 1e-4
SMALL_FEATURES = (4, 4, 8, 8, 16, 4)


def perturbed(module, seed: int = 0):
  """``module`` in eval mode with noise added to every parameter (zero biases, unit norms and
  symmetric inits then do not match by accident)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.add_(0.2 * torch.randn(param.shape, generator=generator))
  return module.eval()


def state(module, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + key: value.numpy() for key, value in module.state_dict().items()}


def channels_first(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(np.moveaxis(x, -1, 1).copy())


def channels_last(t: "torch.Tensor") -> np.ndarray:
  return np.moveaxis(t.detach().numpy(), 1, -1)


def assert_close(ours, reference: np.ndarray) -> float:
  """Asserts the shapes agree and the max abs difference is within TOLERANCE (scaled)."""
  ours = np.asarray(ours)
  assert ours.shape == reference.shape
  diff = float(np.max(np.abs(ours - reference)))
  assert diff <= TOLERANCE * max(1.0, float(np.max(np.abs(reference)))), diff
  return diff


def inputs(*shapes, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def check_block(torch_block, flax_block, *xs: np.ndarray, rule=conv_stage_rule) -> float:
  """Imports ``torch_block``'s weights into ``flax_block`` by the converters' rules and
  compares their outputs on ``xs`` (channels-last)."""
  expected = abstract_params(flax_block, *(x.shape for x in xs))
  params, _ = convert_by_rules(
    state(torch_block),
    "",
    [rule(path, shape) for path, shape in expected.items()],
    what="block",
    hint="",
    expected=expected,
  )
  with torch.no_grad():
    reference = channels_last(torch_block(*(channels_first(x) for x in xs)))
  return assert_close(flax_block.apply({"params": params}, *xs), reference)


@pytest.mark.parametrize(
  "in_channels, out_channels, stride", [(8, 8, 1), (4, 8, 1), (8, 8, 2), (4, 8, 2)]
)
def test_unet_res_block_matches_monai(in_channels, out_channels, stride):
  torch_block = perturbed(
    dynunet_block.UnetResBlock(3, in_channels, out_channels, 3, stride, norm_name="instance")
  )
  assert hasattr(torch_block, "conv3") == (in_channels != out_channels or stride != 1)
  # Odd and even sides: MONAI pads 1 on both sides at stride 2 (Flax's 'SAME' would not).
  (x,) = inputs((2, 7, 6, 8, in_channels))
  check_block(torch_block, UnetResBlock(out_channels, 3, stride), x)


def test_unet_basic_and_out_blocks_match_monai():
  basic = perturbed(dynunet_block.UnetBasicBlock(3, 4, 8, 3, 2, norm_name="instance"), seed=1)
  (x,) = inputs((2, 7, 6, 8, 4))
  check_block(basic, UnetBasicBlock(8, 3, 2), x)
  out = perturbed(dynunet_block.UnetOutBlock(3, 8, 3), seed=2)
  (y,) = inputs((2, 4, 5, 6, 8))
  check_block(out, UnetOutBlock(3), y)


@pytest.mark.parametrize("conv_block, res_block", [(True, True), (True, False), (False, False)])
def test_unetr_pr_up_block_matches_monai(conv_block, res_block):
  torch_block = perturbed(
    unetr_block.UnetrPrUpBlock(
      3, 16, 8, 2, 3, 1, 2, "instance", conv_block=conv_block, res_block=res_block
    )
  )
  (x,) = inputs((2, 2, 3, 2, 16))
  flax_block = UnetrPrUpBlock(8, 2, conv_block=conv_block, res_block=res_block)
  check_block(torch_block, flax_block, x)


@pytest.mark.parametrize("res_block", [True, False])
def test_unetr_up_block_matches_monai(res_block):
  torch_block = perturbed(unetr_block.UnetrUpBlock(3, 16, 8, 3, 2, "instance", res_block))
  x, skip = inputs((2, 3, 2, 3, 16), (2, 6, 4, 6, 8))
  check_block(torch_block, UnetrUpBlock(8, res_block=res_block), x, skip)


def test_up_cat_pads_odd_encoder_sides_as_monai():
  torch_block = perturbed(
    basic_unet.UpCat(
      3, 8, 4, 6, ("LeakyReLU", {"negative_slope": 0.1}), ("instance", {"affine": True}), True
    )
  )
  # Encoder sides 7 and 5 are one longer than the up-sampled 6 and 4: replicate padding.
  x, skip = inputs((2, 3, 2, 3, 8), (2, 7, 4, 7, 4))
  check_block(torch_block, UpCat(6), x, skip, rule=basic_unet_rule)


@pytest.fixture(scope="module")
def monai_basic_unet():
  torch.manual_seed(0)
  return perturbed(
    basic_unet.BasicUNet(spatial_dims=3, in_channels=2, out_channels=3, features=SMALL_FEATURES)
  )


@pytest.fixture(scope="module")
def basic_unet_case(monai_basic_unet):
  """``(x [1, 32, 32, 32, 2], MONAI logits channels-last)``: the smallest cube whose deepest
  level has more than one voxel, which torch's instance norm requires."""
  (x,) = inputs((1, 32, 32, 32, 2), seed=3)
  with torch.no_grad():
    return x, channels_last(monai_basic_unet(channels_first(x)))


def test_basic_unet_3d_matches_monai(monai_basic_unet, basic_unet_case):
  variables, fields = import_basic_unet(state(monai_basic_unet, "model."), spatial_dims=3)
  assert fields == {"out_channels": 3, "features": SMALL_FEATURES, "bias": True}
  x, reference = basic_unet_case
  assert_close(jax.jit(BasicUNet(**fields).apply)(variables, x), reference)


def test_basic_unet_2d_matches_monai():
  torch_model = perturbed(
    basic_unet.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=SMALL_FEATURES),
    seed=4,
  )
  variables, fields = import_basic_unet(state(torch_model))
  (x,) = inputs((2, 48, 32, 1), seed=4)
  with torch.no_grad():
    reference = channels_last(torch_model(channels_first(x)))
  assert_close(jax.jit(BasicUNet(**fields).apply)(variables, x), reference)


def test_basic_unet_refuses_sides_not_multiple_of_16():
  model = BasicUNet(out_channels=2, features=SMALL_FEATURES)
  with pytest.raises(ValueError, match=r"\(1, 32, 40, 32, 1\).*multiple of 16"):
    model.init(jax.random.key(0), np.zeros((1, 32, 40, 32, 1), np.float32))


def test_basic_unet_import_names_bad_keys(monai_basic_unet):
  good = state(monai_basic_unet)
  with pytest.raises(ValueError, match=r"2-D"):
    import_basic_unet(good, spatial_dims=2)
  wrong = dict(good)
  wrong["upcat_2.upsample.deconv.weight"] = np.zeros((8, 3, 2, 2, 2), np.float32)
  with pytest.raises(ValueError, match=r"upcat_2\.upsample\.deconv\.weight: \(8, 3, 2, 2, 2\)"):
    import_basic_unet(wrong)
  extra = dict(good, **{"down_1.convs.conv_0.adn.N.running_mean": np.zeros(4, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \['down_1\.convs\.conv_0\.adn\.N\.run"):
    import_basic_unet(extra)
  missing = {k: v for k, v in good.items() if k != "down_3.convs.conv_1.adn.N.bias"}
  with pytest.raises(ValueError, match=r"missing keys \['down_3\.convs\.conv_1\.adn\.N\.bias'\]"):
    import_basic_unet(missing)


def test_unet3d_cli_round_trip(tmp_path, monai_basic_unet, basic_unet_case):
  path = tmp_path / "basic_unet.pt"
  torch.save({"state_dict": monai_basic_unet.state_dict()}, path)
  assert run(["unet3d", str(path), f"--out={tmp_path / 'out'}"]) == 0
  source = json.loads((tmp_path / "out" / "source.json").read_text())
  assert source["in_channels"] == 2
  fields = source["model_fields"]
  x, reference = basic_unet_case
  ours = jax.jit(BasicUNet(**fields).apply)(load_variables(str(tmp_path / "out")), x)
  assert_close(ours, reference)
