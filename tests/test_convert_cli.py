"""``python -m mammojax.convert``: torch.save -> CLI -> load_variables -> same outputs as torch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mammojax.convert.__main__ import main
from mammojax.convert.store import load_variables
from mammojax.models.imgfeatalign import ImgFeatAlign
from mammojax.models.registration.mammoregnet import MammoRegNet
from mammojax.nn.resnet import MiraiResNet18

torch = pytest.importorskip("torch")
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
  assert main(["mirai", str(path), f"--out={tmp_path / 'out'}"]) == 0
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
  assert main(["imgfeatalign", str(path), f"--out={tmp_path / 'ifa'}", "--num_heads=2"]) == 0
  assert main(["mammoregnet", str(path), f"--out={tmp_path / 'reg'}"]) == 1  # wrong kind
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
  assert main(["mirai", str(path), f"--out={tmp_path / 'x'}"]) == 1
  assert "cannot convert" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
