"""``python -m mammojax.convert``: torch.save -> CLI -> load_variables -> same outputs as torch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mammojax import tasks
from mammojax.convert.__main__ import run
from mammojax.models.imgfeatalign import ImgFeatAlign
from mammojax.models.registration.mammoregnet import MammoRegNet
from mammojax.nn.resnet import MiraiResNet18
from mammojax.runs.config_files import load_config_file
from mammojax.train.variable_store import load_variables

torch = pytest.importorskip("torch")
from torch_refs.efficientnet_torch import TorchEfficientNet  # noqa: E402
from torch_refs.efficientnet_torch import randomize_batch_norm as randomize_norms  # noqa: E402
from torch_refs.fpn_mil_torch import TorchFPN, TorchFPNMIL  # noqa: E402
from torch_refs.imgfeatalign_torch import ImgFeatAlignTorch  # noqa: E402
from torch_refs.mammoregnet_torch import MammoRegNetTorch  # noqa: E402
from torch_refs.resnet_torch import ResNet18Trunk, randomize_batch_norm  # noqa: E402

WIDTH = 8


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def test_help_explains_every_kind():
  result = subprocess.run(
    [sys.executable, "-m", "mammojax.convert", "--help"],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  for kind in ("imgfeatalign", "mammoregnet", "mirai"):
    assert f"  {kind}" in result.stdout
  assert "weights_only=False" in result.stdout  # how to unpickle a Mirai snapshot


def test_mirai_round_trip(tmp_path):
  torch.manual_seed(0)
  trunk = ResNet18Trunk(WIDTH)
  randomize_batch_norm(trunk, torch.Generator().manual_seed(0))
  trunk.eval()
  state = {f"module._model.{k}": v for k, v in trunk.state_dict().items()}
  state["module._model.fc.weight"] = torch.zeros(2, 8 * WIDTH)
  path = tmp_path / "mirai_state.pt"
  torch.save({"model": state}, path)
  assert run(["mirai", str(path), f"--out={tmp_path / 'out'}"]) == 0
  source = json.loads((tmp_path / "out" / "source.json").read_text())
  assert source["model_fields"] == {"base_width": WIDTH}
  assert source["skipped_keys"] == ["_model.fc.weight"]
  images = np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32)
  with torch.no_grad():
    expected = _nhwc(trunk(torch.from_numpy(images).expand(-1, 3, -1, -1)))
  ours = MiraiResNet18(base_width=WIDTH).apply(
    load_variables(str(tmp_path / "out")), images.transpose(0, 2, 3, 1), use_running_average=True
  )
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)


def test_imgfeatalign_round_trip_with_mammoregnet_end_to_end(tmp_path, capsys):
  torch.manual_seed(1)
  registration_t = MammoRegNetTorch()
  with torch.no_grad():  # make the (normally ~0-initialised) flow heads produce a real flow
    for name, param in registration_t.named_parameters():
      if "reg_head" in name:
        param.normal_(0.0, 0.05)
  model_t = ImgFeatAlignTorch(registration_t, width=WIDTH, heads=2)
  randomize_batch_norm(model_t, torch.Generator().manual_seed(1))
  model_t.eval()
  path = tmp_path / "imgfeatalign.pth"
  torch.save(model_t.state_dict(), path)
  assert run(["imgfeatalign", str(path), f"--out={tmp_path / 'ifa'}", "--num_heads=2"]) == 0
  assert run(["mammoregnet", str(path), f"--out={tmp_path / 'reg'}"]) == 1  # wrong kind
  assert "cannot convert" in capsys.readouterr().err
  source = json.loads((tmp_path / "ifa" / "source.json").read_text())
  fields = source["model_fields"]
  assert fields == {
    "num_years": 5,
    "encoder_width": WIDTH,
    "ffn_expansion": 4,
    "time_steps": 240,
    "num_heads": 2,
    "max_time": 5.0,
  }

  rng = np.random.default_rng(1)
  cur = rng.random((2, 64, 64, 1)).astype(np.float32)
  pri = np.roll(cur, 3, axis=1) + 0.05 * rng.random(cur.shape).astype(np.float32)
  gap = np.array([1.5, 3.0], np.float32)
  with torch.no_grad():
    expected = model_t(
      torch.from_numpy(cur.transpose(0, 3, 1, 2)),
      torch.from_numpy(pri.transpose(0, 3, 1, 2)),
      torch.from_numpy(gap),
    )
  model = ImgFeatAlign(
    registration=MammoRegNet(**source["registration_hparams"]), bcrbench_flow_compat=True, **fields
  )
  ours = jax.jit(lambda v: model.apply(v, cur, pri, gap, train=False))(
    load_variables(str(tmp_path / "ifa"))
  )
  assert np.abs(_nhwc(expected["deformation_field"])).max() > 0.1
  np.testing.assert_allclose(
    np.asarray(ours["deformation_field"]),
    _nhwc(expected["deformation_field"]),
    atol=1e-4,
    rtol=1e-4,
  )
  np.testing.assert_allclose(
    np.asarray(ours["aligned_prior_feature"]),
    _nhwc(expected["aligned_prior_feature"]),
    atol=1e-4,
    rtol=1e-4,
  )
  for key, value in expected["risk_prediction"].items():
    np.testing.assert_allclose(
      np.asarray(ours["risk_prediction"][key]), value.numpy(), atol=1e-4, rtol=1e-4, err_msg=key
    )


def test_bad_files_fail_with_a_message(tmp_path, capsys):
  path = tmp_path / "not_a_checkpoint.pt"
  path.write_bytes(b"garbage")
  assert run(["mirai", str(path), f"--out={tmp_path / 'x'}"]) == 1
  assert "cannot convert" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def _calibrate_batch_norm(module, images):
  """Running statistics measured on ``images``: with random ones a tiny EfficientNet's maps no
  longer depend on its input (default init shrinks the signal block by block)."""
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.reset_running_stats()
      m.momentum = None  # cumulative average over the calibration batch
  module.train()
  with torch.no_grad():
    module(images)
  module.eval()


def test_fpn_mil_kind_matches_the_torch_model(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_file = os.path.join(repo, "configs", "fpn_mil.py")
  config = load_config_file(config_file, "smoke")
  m, head = config.model, config.model.head
  assert not m.fpn.group_norm and m.fpn.top_down and head.encoder_type == "mlp"
  model = tasks.build_task(config).model
  backbone = model.backbone
  torch.manual_seed(2)
  model_t = TorchFPNMIL(
    TorchFPN(
      TorchEfficientNet(
        width=m.backbone.width,
        depth=m.backbone.depth,
        static_size=tuple(m.backbone.static_padding_size) or None,
        drop_connect_rate=m.backbone.drop_connect_rate,
      ),
      (backbone.stride16_channels, backbone.stride32_channels),
      features=m.fpn.features,
      group_norm=m.fpn.group_norm,
    ),
    in_dim=m.fpn.features,
    dim=head.encoder_features,
    scales=tuple(head.scales),
    encoder_type=head.encoder_type,
    pooling_type=head.pooling_type,
    attention_hidden=head.attention_hidden,
  )
  randomize_norms(model_t, torch.Generator().manual_seed(2))
  size = config.data.patch_size
  calibration = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(3))
  _calibrate_batch_norm(model_t.inst_encoder, calibration)
  model_t.eval()
  path = tmp_path / "fpn_mil.pth"
  torch.save(model_t.state_dict(), path)
  out = tmp_path / "out"
  assert run(["fpn_mil", str(path), f"--out={out}", f"--config={config_file}:smoke"]) == 0
  source = json.loads((out / "source.json").read_text())
  assert source["kind"] == "fpn_mil"
  assert source["config_file"] == f"{config_file}:smoke"

  patches = np.random.default_rng(2).normal(size=(2, 3, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    logits, side, _ = model_t(torch.from_numpy(patches).permute(0, 1, 4, 2, 3))
  ours = jax.jit(lambda v, x: model.apply(v, x))(load_variables(str(out)), patches)
  assert np.ptp(logits.numpy()) > 1e-2  # the logits depend on the patches
  np.testing.assert_allclose(np.asarray(ours["logits"]), logits.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ours["scale_logits"]), side.numpy(), atol=1e-4, rtol=1e-4)


def test_fpn_mil_kind_needs_its_config(tmp_path, capsys):
  path = tmp_path / "fpn_mil.pth"
  torch.save({"classifier.head_classifier.weight": torch.zeros(1, 8)}, path)
  assert run(["fpn_mil", str(path), f"--out={tmp_path / 'out'}"]) == 1
  assert "--config" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


PROJECTION_DIM = 16


def _mammoclip_checkpoint(net) -> dict:
  """A Mammo-CLIP-shaped state dict: B2 image encoder with its 1x1 head, a (tiny) text encoder,
  linear image and text projections and logit_scale."""
  generator = torch.Generator().manual_seed(5)

  def rand(*shape):
    return torch.randn(*shape, generator=generator)

  state = {"image_encoder." + k: v for k, v in net.state_dict().items()}
  state.update(
    {
      "text_encoder.embeddings.word_embeddings.weight": rand(30, 4),
      "text_encoder.encoder.layer.0.attention.self.query.weight": rand(4, 4),
      "text_encoder.encoder.layer.0.attention.self.query.bias": rand(4),
      "image_projection.projection.weight": rand(PROJECTION_DIM, 1408) * 0.05,
      "image_projection.projection.bias": rand(PROJECTION_DIM),
      "text_projection.projection.weight": rand(PROJECTION_DIM, 4),
      "text_projection.projection.bias": rand(PROJECTION_DIM),
      "logit_scale": torch.tensor(2.66),
    }
  )
  return state


@pytest.fixture(scope="module")
def mammoclip_b2():
  from mammojax.nn.efficientnet import MAMMOCLIP_STATIC_SIZE

  torch.manual_seed(4)
  net = TorchEfficientNet(static_size=MAMMOCLIP_STATIC_SIZE, include_head=True)
  randomize_norms(net, torch.Generator().manual_seed(4))
  return net.eval()


def test_mammoclip_lists_what_it_drops_and_include_head_keeps_the_head(
  tmp_path, capsys, mammoclip_b2
):
  from mammojax.convert.mammoclip_projection import mammoclip_image_embedding
  from mammojax.nn.efficientnet import EfficientNet

  state = _mammoclip_checkpoint(mammoclip_b2)
  path = tmp_path / "b2-model-best-epoch-10.tar"
  torch.save({"model": state, "epoch": 10, "best_loss": np.float64(1.25)}, path)
  head_parts = {
    "image_encoder._conv_head.": (1, 1408 * 352),
    "image_encoder._bn1.": (4, 4 * 1408),
    "image_projection.": (2, PROJECTION_DIM * 1408 + PROJECTION_DIM),
  }
  always = {
    "text_encoder.": (3, 30 * 4 + 4 * 4 + 4),
    "text_projection.": (2, PROJECTION_DIM * 4 + PROJECTION_DIM),
    "logit_scale": (1, 1),
  }

  def dropped(source):
    return {g["prefix"]: (g["tensors"], g["parameters"]) for g in source["dropped"]}

  assert run(["mammoclip", str(path), f"--out={tmp_path / 'plain'}"]) == 0
  printed = capsys.readouterr().out
  assert (
    "dropped 6 key prefixes" in printed and "text_encoder. (3 tensors, 140 parameters)" in printed
  )
  assert "--include_head" in printed
  plain = json.loads((tmp_path / "plain" / "source.json").read_text())
  assert dropped(plain) == {**always, **head_parts}
  assert plain["model_fields"]["include_head"] is False and plain["image_projection"] is None
  assert "conv_head" not in load_variables(str(tmp_path / "plain"))["params"]

  out = tmp_path / "with_head"
  assert run(["mammoclip", str(path), f"--out={out}", "--include_head"]) == 0
  printed = capsys.readouterr().out
  assert "dropped 3 key prefixes" in printed and "image_projection." not in printed
  source = json.loads((out / "source.json").read_text())
  assert dropped(source) == always
  assert source["image_projection"] == {
    "type": "linear",
    "embedding_dim": 1408,
    "projection_dim": PROJECTION_DIM,
  }
  variables = load_variables(str(out))
  np.testing.assert_array_equal(
    variables["params"]["image_projection"]["projection"]["kernel"],
    state["image_projection.projection.weight"].numpy().T,
  )
  fields = dict(source["model_fields"])
  fields["static_padding_size"] = tuple(fields["static_padding_size"])
  assert fields["include_head"] is True
  model = EfficientNet(**fields)  # params/image_projection is extra: EfficientNet ignores it
  images = np.random.default_rng(4).normal(size=(1, 64, 64, 3)).astype(np.float32)
  ours = jax.jit(lambda v, x: model.apply(v, x))(variables, images)["head"]
  with torch.no_grad():
    head = mammoclip_b2(torch.from_numpy(images).permute(0, 3, 1, 2))[-1]
    embedding = torch.nn.functional.linear(
      head.mean(dim=(2, 3)),
      state["image_projection.projection.weight"],
      state["image_projection.projection.bias"],
    )
  np.testing.assert_allclose(np.asarray(ours), _nhwc(head), atol=1e-4, rtol=1e-4)
  assert np.ptp(embedding.numpy()) > 1e-2  # the embedding is no constant
  np.testing.assert_allclose(
    np.asarray(mammoclip_image_embedding(variables, ours)), embedding.numpy(), atol=1e-4, rtol=1e-4
  )


def test_mammoclip_mlp_projection_matches_torch():
  from mammojax.convert.mammoclip_projection import (
    import_image_projection,
    mammoclip_image_embedding,
  )

  torch.manual_seed(6)
  projection, fc = torch.nn.Linear(12, 8), torch.nn.Linear(8, 8)
  layer_norm = torch.nn.LayerNorm(8)
  with torch.no_grad():
    layer_norm.weight.normal_(1.0, 0.2)
    layer_norm.bias.normal_(0.0, 0.2)
  state = {
    **{f"image_projection.projection.{k}": v for k, v in projection.state_dict().items()},
    **{f"image_projection.fc.{k}": v for k, v in fc.state_dict().items()},
    **{f"image_projection.layer_norm.{k}": v for k, v in layer_norm.state_dict().items()},
    "text_projection.projection.weight": torch.zeros(8, 4),
  }
  params, description = import_image_projection(state, embedding_dim=12)
  assert description == {"type": "mlp", "embedding_dim": 12, "projection_dim": 8}
  head = np.random.default_rng(6).normal(size=(2, 3, 3, 12)).astype(np.float32)
  with torch.no_grad():
    pooled = torch.from_numpy(head).mean(dim=(1, 2))
    projected = projection(pooled)
    expected = layer_norm(fc(torch.nn.functional.gelu(projected)) + projected).numpy()
  ours = mammoclip_image_embedding({"params": {"image_projection": params}}, head)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="takes 12 features but the encoder's head has 1408"):
    import_image_projection(state, embedding_dim=1408)
