"""ICON UNet2 weights into Flax (mammojax/convert/icon.py, models/registration/icon_unet.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shipped_configs import shipped_config

from mammojax.convert import icon as icon_convert
from mammojax.models.registration import icon
from mammojax.models.registration.icon_unet import ICONUNet2

DOWN = (2, 4, 8, 8)
UP = (4, 6, 8)


def _torch_unet2(torch, dimension):
  """UNet2 written from ICON's architecture description (not its code)."""
  F = torch.nn.functional
  conv = torch.nn.Conv2d if dimension == 2 else torch.nn.Conv3d
  conv_t = torch.nn.ConvTranspose2d if dimension == 2 else torch.nn.ConvTranspose3d
  norm = torch.nn.BatchNorm2d if dimension == 2 else torch.nn.BatchNorm3d
  pool = F.avg_pool2d if dimension == 2 else F.avg_pool3d
  mode = "bilinear" if dimension == 2 else "trilinear"

  def fit_channels(x, channels):
    x = x[:, :channels]
    missing = channels - x.shape[1]
    if missing > 0:
      x = torch.cat([x.new_zeros((x.shape[0], missing, *x.shape[2:])), x], 1)
    return x

  class UNet2(torch.nn.Module):
    def __init__(self):
      super().__init__()
      layers = len(UP)
      up_in = [DOWN[d + 1] + (UP[d + 1] if d + 1 < layers else 0) for d in range(layers)]
      self.downConvs = torch.nn.ModuleList(
        conv(DOWN[d], DOWN[d + 1], 3, stride=2, padding=1) for d in range(layers)
      )
      self.upConvs = torch.nn.ModuleList(
        conv_t(up_in[d], UP[d], 4, stride=2, padding=1) for d in range(layers)
      )
      self.batchNorms = torch.nn.ModuleList(norm(UP[d]) for d in range(layers))
      self.lastConv = conv(DOWN[0] + UP[0], dimension, 3, padding=1)

    def forward(self, a, b):
      x = torch.cat([a, b], 1)
      skips = []
      for d in range(len(UP)):
        skips.append(x)
        y = self.downConvs[d](F.leaky_relu(x))
        x = y + fit_channels(pool(x, 2, ceil_mode=True), y.shape[1])
      for d in reversed(range(len(UP))):
        y = self.upConvs[d](F.leaky_relu(x))
        x = y + F.interpolate(
          fit_channels(x, y.shape[1]), scale_factor=2, mode=mode, align_corners=False
        )
        x = self.batchNorms[d](x)
        x = x[(slice(None), slice(None), *[slice(0, n) for n in skips[d].shape[2:]])]
        x = torch.cat([x, skips[d]], 1)
      return self.lastConv(x) / 10

  return UNet2()


@pytest.mark.parametrize("shape", [(13, 11), (9, 7, 6)])
def test_unet2_matches_torch(shape):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = _torch_unet2(torch, len(shape))
  with torch.no_grad():
    for p in net.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
    for bn in net.batchNorms:
      bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.2)
      bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
  net.eval()
  rng = np.random.default_rng(1)
  a, b = (rng.random((2, 1, *shape), dtype=np.float32) for _ in range(2))
  with torch.no_grad():
    want = net(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  params, stats = icon_convert.import_unet2(state, "", len(UP))
  to_last = lambda x: jnp.asarray(np.moveaxis(x, 1, -1))  # noqa: E731
  got = ICONUNet2(DOWN, UP).apply({"params": params, "batch_stats": stats}, to_last(a), to_last(b))
  np.testing.assert_allclose(np.asarray(got), np.moveaxis(want, 1, -1), atol=1e-4, rtol=1e-4)
  assert float(np.abs(want).max()) > 1e-2  # the comparison is not vacuous


def _fake_unet_state(prefix, rng, dimension=2):
  """Random UNet2-shaped arrays under ``prefix`` (shapes as torch stores them)."""
  layers = len(UP)
  up_in = [DOWN[d + 1] + (UP[d + 1] if d + 1 < layers else 0) for d in range(layers)]
  k3, k4 = (3,) * dimension, (4,) * dimension
  state = {}
  for d in range(layers):
    state[f"{prefix}downConvs.{d}.weight"] = rng.normal(size=(DOWN[d + 1], DOWN[d], *k3))
    state[f"{prefix}downConvs.{d}.bias"] = rng.normal(size=(DOWN[d + 1],))
    state[f"{prefix}upConvs.{d}.weight"] = rng.normal(size=(up_in[d], UP[d], *k4))
    state[f"{prefix}upConvs.{d}.bias"] = rng.normal(size=(UP[d],))
    for name in ("weight", "bias", "running_mean"):
      state[f"{prefix}batchNorms.{d}.{name}"] = rng.normal(size=(UP[d],))
    state[f"{prefix}batchNorms.{d}.running_var"] = rng.random(UP[d]) + 0.5
    state[f"{prefix}batchNorms.{d}.num_batches_tracked"] = np.array(3)
  state[f"{prefix}lastConv.weight"] = rng.normal(size=(dimension, DOWN[0] + UP[0], *k3))
  state[f"{prefix}lastConv.bias"] = rng.normal(size=(dimension,))
  return state


def test_unigradicon_style_tree_imports_onto_matching_modules():
  rng = np.random.default_rng(0)
  # GradientICON(TwoStep(Downsample(FunctionFromVectorField(U)), FunctionFromVectorField(U))).
  state = {"identity_map": np.zeros((1, 2, 16, 16)), "regis_net.identity_map": np.zeros(1)}
  state.update(_fake_unet_state("regis_net.netPhi.net.net.", rng))
  state.update(_fake_unet_state("regis_net.netPsi.net.", rng))
  state["regis_net.netPhi.net.identity_map"] = np.zeros(1)
  module = icon_convert.build_icon_registration(state)
  assert isinstance(module, icon.TwoStepRegistration)
  assert isinstance(module.first, icon.DownsampleRegistration)
  variables = icon_convert.import_icon_registration(state)
  images = jnp.zeros((1, 16, 16, 1))
  init = nn.meta.unbox(module.init(jax.random.key(0), images, images))
  shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
  assert shapes(variables) == shapes(init)
  np.testing.assert_allclose(
    variables["params"]["second"]["net"]["downConvs_1"]["kernel"],
    np.moveaxis(state["regis_net.netPsi.net.downConvs.1.weight"], (0, 1), (-1, -2)),
  )
  displacement = module.apply(variables, images + 0.5, images)
  assert displacement.shape == (1, 16, 16, 2) and bool(jnp.all(jnp.isfinite(displacement)))


def test_bad_state_dicts_raise():
  with pytest.raises(ValueError, match="downConvs.0.weight"):
    icon_convert.describe_icon_tree({"conv.weight": np.zeros((1, 1, 3, 3))})
  state = _fake_unet_state("", np.random.default_rng(0))
  state["extra.weight"] = np.zeros(3)
  with pytest.raises(ValueError, match="extra.weight"):
    icon_convert.import_icon_registration(state)


def test_converted_weights_initialise_gradicon_task_on_png_pairs(tmp_path):
  from PIL import Image

  from mammojax import tasks
  from mammojax.train.trainer import train_and_evaluate
  from mammojax.train.variable_store import save_variables

  rng = np.random.default_rng(0)
  images = tmp_path / "images"
  images.mkdir()
  for i in range(20):  # 16 train, 2 val, 2 test
    Image.fromarray(rng.integers(0, 255, (20, 18), dtype=np.uint8)).save(images / f"{i}.png")
  state = _fake_unet_state("", rng)
  converted = tmp_path / "converted"
  save_variables(
    str(converted),
    icon_convert.import_icon_registration(state),
    {
      "kind": "icon",
      "model_fields": icon_convert.describe_icon_tree(state),
      "input_shape": [16, 16],
    },
  )
  config = shipped_config("gradicon_unet", "smoke")
  config.data.image_dir = str(images)
  config.data.image_size = (16, 16)
  config.model.down_features, config.model.up_features = DOWN, UP
  config.init_from = str(converted)
  config.train.steps = 1
  config.optim.learning_rate = 0.0
  task = tasks.build_task(config)
  summary = train_and_evaluate(config, str(tmp_path / "run"), task, show_progress=False)
  assert np.isfinite(summary["eval"]["eval/lncc"])
  batch = task.dataset("val")[0]
  assert batch["moving"].shape == (16, 16, 1) and 0.0 <= batch["moving"].min()


def test_convert_cli_icon_kind_feeds_the_register_command(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from mammojax import register
  from mammojax.convert.__main__ import run as convert_main

  rng = np.random.default_rng(1)
  state = {
    k: torch.from_numpy(np.asarray(v, np.float32))
    for k, v in _fake_unet_state("regis_net.net.", rng).items()
  }
  path = tmp_path / "icon.pth"
  torch.save(state, path)
  out = tmp_path / "converted"
  assert convert_main(["icon", str(path), f"--out={out}"]) == 1
  assert "--input_shape is required" in capsys.readouterr().err
  assert convert_main(["icon", str(path), f"--out={out}", "--input_shape=16,16"]) == 0

  fixed, moving = rng.random((2, 16, 16)).astype(np.float32)
  field = register.predict_displacement(str(out), fixed, moving)
  module = icon_convert.build_icon_registration({k: v.numpy() for k, v in state.items()})
  variables = icon_convert.import_icon_registration({k: v.numpy() for k, v in state.items()})
  want = module.apply(variables, moving[None, ..., None], fixed[None, ..., None])[0]
  assert float(np.max(np.abs(want))) > 1e-4
  np.testing.assert_allclose(field, want, atol=1e-4)
