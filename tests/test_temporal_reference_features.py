"""Features as Temporal-GradCam takes them: converted torchvision weights through our extraction
give torchvision's own features on the reference's input scaling (ResNet: the raw [0, 1] slice
repeated to 3 channels; ViT: quantised to 8 bits, resized, its class token after the final
LayerNorm)."""

import os

import grain
import numpy as np
import pytest
from shipped_configs import shipped_config

from mammojax import tasks
from mammojax.convert.__main__ import run as convert
from mammojax.data import records
from mammojax.tasks.temporal_features import backbone_subtree, ensure_features
from mammojax.train.init_state import load_pretrained
from mammojax.train.variable_store import load_variables

torch = pytest.importorskip("torch")
from torch_refs.torchvision_import import import_torchvision  # noqa: E402

torchvision = import_torchvision()


def _image_dir(tmp_path):
  config = shipped_config("temporal", "resnet,dnn,smoke")
  config.data.synthetic.root = str(tmp_path / "data")
  return tasks.build_task(config).image_dir


def _train_records(directory):
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory, "train"))
  return [records.decode_example(source[i]) for i in range(len(source))]


def _converted(model, kind, tmp_path, *flags):
  path = str(tmp_path / f"{kind}.pt")
  torch.save(model.state_dict(), path)
  out = str(tmp_path / f"{kind}_converted")
  assert convert([kind, path, f"--out={out}", *flags]) == 0
  return out


def _records_and_features(image_dir, fields, converted, tmp_path):
  variables = backbone_subtree(load_pretrained(converted), converted)
  features_dir = ensure_features(image_dir, fields, variables, str(tmp_path / "features"))
  with_images = _train_records(image_dir)
  longest = int(np.argmax([int(r["length"]) for r in with_images]))  # several images
  return with_images[longest], _train_records(features_dir)[longest]


def test_resnet18_features_match_torchvision_on_the_raw_slice(tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.resnet18(num_classes=2).eval()
  converted = _converted(model, "resnet", tmp_path)
  assert "fc" in load_variables(converted)["params"]  # the ImageNet-style head is dropped later
  fields = {"kind": "resnet", "depth": 18, "base_width": 64, "input_scaling": "unit"}
  record, features = _records_and_features(_image_dir(tmp_path), fields, converted, tmp_path)
  slices = record["images"].astype(np.float32) / 65535.0  # [T, H, W] in [0, 1]
  model.fc = torch.nn.Identity()
  with torch.inference_mode():
    expected = model(torch.from_numpy(np.repeat(slices[:, None], 3, axis=1))).numpy()
  assert features["features"].shape == (len(slices), 512)
  np.testing.assert_allclose(features["features"], expected, atol=1e-4)


def test_vit_features_match_torchvision_on_quantised_resized_slices(tmp_path):
  torch.manual_seed(0)
  model = torchvision.models.vision_transformer.VisionTransformer(
    image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
  ).eval()
  # 4 heads of width 16: not ViT-B's head width of 64, so the converter is told.
  converted = _converted(model, "vit", tmp_path, "--vit_num_heads=4")
  fields = {
    "kind": "vit",
    "patch_size": 8,
    "hidden_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_dim": 128,
    "image_size": 32,
    "input_scaling": "unit_quantized",
    "input_size": 32,
  }
  record, features = _records_and_features(_image_dir(tmp_path), fields, converted, tmp_path)
  slices = record["images"].astype(np.float32) / np.float32(65535.0)
  # The reference: PIL.Image.fromarray(np.int16(img * 255)).convert('RGB') -> ToTensor -> Resize.
  quantised = np.int16(slices * np.float32(255)).astype(np.float32) / 255.0
  x = torch.from_numpy(np.repeat(quantised[:, None], 3, axis=1))
  x = torchvision.transforms.functional.resize(x, [32, 32], antialias=True)
  model.heads = torch.nn.Identity()
  with torch.inference_mode():
    expected = model(x).numpy()
  np.testing.assert_allclose(features["features"], expected, atol=1e-4)
  assert os.path.isdir(converted)
