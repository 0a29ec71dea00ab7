"""Real training checkpoints load with ``weights_only=True`` (numpy metrics, pathlib paths next to
the weights); a pickle that would run code is still refused, naming the global."""

import builtins
import json
import os
import pathlib
import zipfile

import numpy as np
import pytest

from mammojax.convert.__main__ import run
from mammojax.convert.torch_files import checkpoint_safe_globals, load_torch_state_dict
from mammojax.train.variable_store import load_variables

torch = pytest.importorskip("torch")
from torch_refs.resnet_torch import ResNet18Trunk, randomize_batch_norm  # noqa: E402

WIDTH = 8


def _trunk_state() -> dict:
  """A Mirai ResNet-18 trunk's state dict in BCRBench's layout (encoder.0 the downsampler,
  encoder.1-8 the blocks, behind DataParallel's 'module.'), as its save_checkpoint stores it."""
  torch.manual_seed(0)
  trunk = ResNet18Trunk(WIDTH)
  randomize_batch_norm(trunk, torch.Generator().manual_seed(0))
  return {
    f"module.encoder.{i}.{key}": value
    for i, block in enumerate(trunk.blocks())
    for key, value in block.state_dict().items()
  }


def _assert_same_state(loaded: dict, saved: dict, prefix: str = "") -> None:
  assert sorted(loaded) == sorted(k[len(prefix) :] for k in saved)
  for key, value in saved.items():
    np.testing.assert_array_equal(loaded[key[len(prefix) :]], value.numpy(), err_msg=key)


def _bcrbench_checkpoint(state: dict) -> dict:
  """BCRBench's save_checkpoint: epoch, state dict, numpy float64 C-index, optimizer state."""
  model = torch.nn.Linear(3, 2)
  optimizer = torch.optim.Adam(model.parameters())
  model(torch.ones(1, 3)).sum().backward()
  optimizer.step()
  return {
    "epoch": 3,
    "state_dict": state,
    "best_c_index": np.float64(0.71),
    "optimizer": optimizer.state_dict(),
  }


def test_bcrbench_checkpoint_loads_and_converts(tmp_path):
  state = _trunk_state()
  path = tmp_path / "checkpoint_best.pth.tar"
  torch.save(_bcrbench_checkpoint(state), path)
  _assert_same_state(load_torch_state_dict(str(path)), state, prefix="module.")
  left = set(torch.serialization.get_safe_globals())
  assert not left & set(checkpoint_safe_globals())  # allowed during the call only
  assert run(["mirai", str(path), f"--out={tmp_path / 'out'}"]) == 0
  torch.save(state, tmp_path / "bare.pt")  # the same weights without anything around them
  assert run(["mirai", str(tmp_path / "bare.pt"), f"--out={tmp_path / 'bare'}"]) == 0
  source = json.loads((tmp_path / "out" / "source.json").read_text())
  assert source["model_fields"] == {"base_width": WIDTH}
  assert source["layout"] == "sequential (prefix 'encoder.')"
  ours, bare = load_variables(str(tmp_path / "out")), load_variables(str(tmp_path / "bare"))
  same = [np.array_equal(a, b) for a, b in zip(_leaves(ours), _leaves(bare))]
  assert len(same) > 10 and all(same)


def _leaves(tree: dict) -> list:
  if isinstance(tree, dict):
    return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
  return [tree]


def test_fpn_mil_checkpoint_with_numpy_metrics_and_paths_loads(tmp_path):
  state = {
    "classifier.head_classifier.weight": torch.randn(1, 8),
    "classifier.head_classifier.bias": torch.randn(1),
  }
  checkpoint = {
    "model": state,
    "epoch": 12,
    "metrics": {
      "auc": np.float64(0.83),
      "f1": np.float32(0.61),
      "tp": np.int64(17),
      "better": np.bool_(True),
      "threshold": np.array(0.5),
      "per_fold_auc": np.array([0.8, 0.85], np.float32),
    },
    "args": {
      "output_dir": pathlib.PosixPath("/x/runs"),
      "data_dir": pathlib.PurePosixPath("/data"),
      "windows_dir": pathlib.PureWindowsPath("C:/data"),
    },
  }
  path = tmp_path / "best_model.pth"
  torch.save(checkpoint, path)
  _assert_same_state(load_torch_state_dict(str(path)), state)


def test_numpy_1_names_load(tmp_path):
  """numpy 1 pickles scalars and arrays as numpy.core.multiarray.*, numpy 2 as numpy._core."""
  state = {"w": torch.arange(3.0)}
  torch.save({"model": state, "c_index": np.float64(0.7), "loss": np.array(0.1)}, tmp_path / "a.pt")
  with zipfile.ZipFile(tmp_path / "a.pt") as src, zipfile.ZipFile(tmp_path / "b.pt", "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("data.pkl"):
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
      dst.writestr(info, data)
  names = torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "b.pt"))
  assert "numpy.core.multiarray.scalar" in names
  _assert_same_state(load_torch_state_dict(str(tmp_path / "b.pt")), state)


class _Shell:
  def __init__(self, target: str):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"echo pwned > {self.target}",))


class _Eval:
  def __init__(self, target: str):
    self.target = target

  def __reduce__(self):
    return (builtins.eval, (f"open({self.target!r}, 'w').write('pwned')",))


@pytest.mark.parametrize(
  "payload, name",
  [(_Shell, f"{os.system.__module__}.system"), (_Eval, "builtins.eval")],
  ids=["os.system", "builtins.eval"],
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_running_pickles_are_refused(tmp_path, capsys, payload, name, zip_format):
  target = tmp_path / "pwned"
  path = tmp_path / "ckpt.pt"
  checkpoint = {"model": {"w": torch.zeros(2)}, "x": payload(str(target))}
  torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(ValueError) as err:
    load_torch_state_dict(str(path))
  message = str(err.value)
  assert "\n" not in message
  assert repr(str(path)) in message and name in message
  assert "loads only weights" in message and "never falls back to weights_only=False" in message
  assert not target.exists()
  assert run(["mirai", str(path), f"--out={tmp_path / 'out'}"]) == 1
  err_lines = capsys.readouterr().err.strip().splitlines()
  assert len(err_lines) == 1 and name in err_lines[0]
  assert not target.exists() and not (tmp_path / "out").exists()


def test_object_arrays_stay_refused(tmp_path):
  path = tmp_path / "ckpt.pt"
  torch.save({"model": {"w": torch.zeros(2)}, "x": np.array([1, "a"], dtype=object)}, path)
  with pytest.raises(
    ValueError, match=r"it pickles numpy\.dtypes\.ObjectDType.*loads only weights"
  ):
    load_torch_state_dict(str(path))


def test_globals_the_caller_allowed_stay_allowed(tmp_path):
  torch.save({"model": {"w": torch.zeros(1)}, "auc": np.float64(0.5)}, tmp_path / "a.pt")
  with torch.serialization.safe_globals([np.dtype]):  # the caller's own allowance
    load_torch_state_dict(str(tmp_path / "a.pt"))
    assert np.dtype in torch.serialization.get_safe_globals()
