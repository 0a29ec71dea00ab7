"""python -m mammojax.explain on an online FPN-MIL run with a frozen encoder: image-level maps of
the bag's logit (the plain gradient for guided backpropagation: SiLU), beside the model's
attention heatmaps, all scored against the lesion boxes; an offline run and a second target are
refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shipped_configs import smoke_config

from mammojax import explain, tasks
from mammojax.extract_features import extract_features
from mammojax.interpret import mil
from mammojax.interpret.methods import MethodSettings
from mammojax.runs.restore import restore_run
from mammojax.train import trainer

HEATMAPS = ("attention_16", "attention_32", "attention_128", "attention_aggregated")


def _train(config, workdir):
  config.mesh.shape = (1, 1, 1)
  config.train.steps = config.eval.every_steps = config.checkpoint.every_steps = 1
  trainer.train_and_evaluate(config, workdir, tasks.build_task(config), show_progress=False)
  return config


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
  """``configs/fpn_mil.py:smoke`` (its encoder frozen), one step on one device."""
  tmp_path = tmp_path_factory.mktemp("fpn_mil_explain")
  workdir = str(tmp_path / "run")
  return _train(smoke_config("fpn_mil", tmp_path), workdir), workdir, tmp_path


def _explain(*args):
  return explain.run([*args, "--noprogress"])


def test_command_maps_images_beside_attention_heatmaps(online_run, tmp_path):
  config, workdir, _ = online_run
  out = tmp_path / "out"
  summary = _explain(
    f"--workdir={workdir}",
    "--split=test",
    "--num_examples=2",
    "--methods=gradcam,guided_backprop,integrated_gradients",
    "--n_steps=4",
    f"--out={out}",
  )
  with open(out / "attributions.json") as f:
    assert json.load(f) == summary
  assert summary["settings"]["layer"] == "fpn/stride_16"
  assert summary["guided_rectified"] is False and "SiLU" in summary["notes"][0]
  height, width = config.data.image_size
  for row in summary["examples"]:
    assert row["target"] == 0 and row["attention_heatmaps"] == list(HEATMAPS)
    directory = out / row["name"]
    assert np.load(directory / "gradcam.npy").shape == (height, width)
    for name in ("guided_backprop", "integrated_gradients"):
      pixels = np.load(directory / f"{name}.npy")
      # The encoder is frozen: the model stops its gradient, the maps still reach the pixels.
      assert pixels.shape == (height, width, 1) and np.abs(pixels).sum() > 0
    for name in HEATMAPS:
      heat = np.load(directory / f"{name}.npy")
      assert heat.shape == (height, width) and 0.0 <= heat.min() <= heat.max() <= 1.0
    assert os.path.getsize(directory / "methods.png") > 0
  # test_0001 holds a mass (its boxes are the region), test_0000 none: every map, the attention
  # heatmaps included, is scored on the one example with a lesion.
  scores = summary["scores"]
  assert set(scores) == {"gradcam", "guided_backprop", "integrated_gradients", "region", *HEATMAPS}
  assert summary["examples"][1]["label"] == 1 and scores["region"]["area_fraction"]["count"] == 1
  for name in ("gradcam", "integrated_gradients", *HEATMAPS):
    game = scores[name]["pointing_game"]
    assert game["count"] + game["unscorable"] == 2 and game["unscorable"] >= 1


def test_image_maps_are_the_bags_gradient(online_run, tmp_path):
  config, workdir, _ = online_run
  run = restore_run(workdir, example_split="test")
  example = run.task.explain_dataset("test")[1]
  model, variables = run.task.model, run.variables
  patches = jnp.asarray(example["patches"])[None]
  mask = jnp.asarray(example["patch_mask"])[None]
  coords, real = example["patch_coords"], example["patch_mask"]
  adapter = mil.mil_adapter(model, variables, coords, real, config.data.patch_size)
  image = jnp.asarray(example["image"])[None]

  # The patches cut from the image in the graph are the bag's; the logit is the model's.
  np.testing.assert_array_equal(
    np.asarray(mil.cut_patches(image, jnp.asarray(coords), config.data.patch_size))[0][real],
    example["patches"][real],
  )

  def bag_logit(module):
    return jax.jit(jax.value_and_grad(lambda p: module.apply(variables, p, mask)["logits"][0]))

  # The model stops the gradient at its frozen encoder; the adapter's does not. Its logit is the
  # model's, its image gradient the bag's patch gradients added back where each patch came from.
  logit, frozen = bag_logit(model)(patches)
  assert float(jnp.abs(frozen).max()) == 0.0
  np.testing.assert_allclose(adapter.forward(image)[0, 0], logit, atol=1e-6)
  through = model.clone(gradient_through_frozen_backbone=True)
  per_patch = np.asarray(bag_logit(through)(patches)[1])[0]
  size = config.data.patch_size
  expected = np.zeros(example["image"].shape, np.float32)
  for (row, col), gradient in zip(coords[real], per_patch[real]):
    expected[row : row + size, col : col + size] += gradient
  maps = mil.mil_maps(
    adapter, image, ["guided_backprop", "gradcam"], MethodSettings(layer="fpn/stride_16")
  )
  assert np.abs(expected).max() > 0
  np.testing.assert_allclose(maps["guided_backprop"][0], expected, atol=1e-6)
  # GradCAM covers the real patches and nothing else.
  covered = np.zeros(example["image"].shape[:2], bool)
  for row, col in coords[real]:
    covered[row : row + size, col : col + size] = True
  assert np.all(maps["gradcam"][0][~covered] == 0) and np.abs(maps["gradcam"][0]).max() > 0


def test_a_second_target_and_an_offline_run_are_refused(online_run, tmp_path):
  config, workdir, tmp = online_run
  with pytest.raises(ValueError, match="--target=1: FPN-MIL has one output"):
    _explain(f"--workdir={workdir}", "--methods=gradcam", "--target=1", f"--out={tmp_path}/a")

  features = str(tmp / "features")
  extract_features(config, features, workdir, batch_size=4)
  offline = smoke_config("fpn_mil", tmp)
  offline.data.features_dir = features
  offline_workdir = str(tmp / "offline_run")
  _train(offline, offline_workdir)
  with pytest.raises(ValueError, match="explain maps pixels, so it needs FPN-MIL's online model"):
    _explain(f"--workdir={offline_workdir}", f"--out={tmp_path}/b")
