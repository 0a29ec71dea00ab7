"""python -m mammojax.explain on a trained image classifier, a trained end-to-end sequence model
and a converted backbone with image files: the maps it writes are the library's, the figures
and the JSON are there, and bad requests are named."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from image_files import phantom, write_png
from shipped_configs import temporal_smoke_config

from mammojax import explain, interpret, tasks
from mammojax.nn.resnet import ResNet
from mammojax.runs.restore import restore_run
from mammojax.train import trainer
from mammojax.train.variable_store import save_variables


@pytest.fixture(scope="module")
def classifier_run(temporal_backbone_run):
  """The smoke ResNet image classifier (the pretraining stage), trained once."""
  return temporal_backbone_run


def _explain(*args):
  return explain.run([*args, "--noprogress"])


def test_classifier_run_maps_scores_and_sanity(classifier_run, tmp_path):
  _, workdir = classifier_run
  out = tmp_path / "out"
  summary = _explain(
    f"--workdir={workdir}",
    "--split=val",
    "--num_examples=3",
    "--methods=gradcam,guided_backprop,integrated_gradients",
    "--n_steps=8",
    "--sanity_check",
    f"--out={out}",
  )
  assert [row["name"] for row in summary["examples"]] == ["val_0000", "val_0001", "val_0002"]
  assert summary["settings"]["layer"] == "layer4" and summary["guided_rectified"]
  with open(out / "attributions.json") as f:
    assert json.load(f) == summary
  cam = np.load(out / "val_0000" / "gradcam.npy")
  guided = np.load(out / "val_0000" / "guided_backprop.npy")
  assert cam.shape == (16, 16) and guided.shape == (16, 16, 1)
  assert os.path.getsize(out / "val_0000" / "methods.png") > 0

  # The written map is the library's on the restored weights, for the predicted class.
  run = restore_run(workdir, example_split="val")
  example = run.task.explain_dataset("val")[0]
  adapter = interpret.classifier_adapter(run.task.model, run.variables)
  images = jnp.asarray(example["images"])[None]
  target = int(jnp.argmax(adapter.forward(images)[0]))
  assert summary["examples"][0]["target"] == target
  np.testing.assert_allclose(
    cam, interpret.gradcam(adapter, images, target, "layer4")[0], atol=1e-6
  )

  # The pretraining cohort marks its ventricles: every method is scored on them.
  scores = summary["scores"]
  assert set(scores) == {"gradcam", "guided_backprop", "integrated_gradients", "region"}
  area = scores.pop("region")["area_fraction"]
  assert area["count"] == 3 and 0 < area["mean"] < 0.5
  for per_method in scores.values():
    assert per_method["pointing_game"]["count"] + per_method["pointing_game"]["unscorable"] == 3
    fraction = per_method["positive_fraction_inside"]["mean"]
    assert fraction is None or 0.0 <= fraction <= 1.0
  sanity = summary["sanity_check"]
  assert sanity["stages"] == ["head", "backbone"]
  for name in ("gradcam", "guided_backprop", "integrated_gradients"):
    assert [step["randomized"] for step in sanity[name]] == [["head"], ["head", "backbone"]]


def test_end_to_end_run_maps_every_visit(classifier_run, tmp_path):
  root, backbone = classifier_run
  config = temporal_smoke_config("resnet,gru,end_to_end", root)
  config.model.backbone_checkpoint = backbone
  workdir = str(tmp_path / "e2e")
  trainer.train_and_evaluate(config, workdir, tasks.build_task(config), show_progress=False)
  out = tmp_path / "out"
  summary = _explain(
    f"--workdir={workdir}",
    "--num_examples=2",
    "--methods=gradcam,integrated_gradients",
    "--n_steps=16",
    "--sanity_check",
    f"--out={out}",
  )
  assert summary["sanity_check"]["stages"] == ["classifier"]
  assert len(summary["sanity_check"]["gradcam"]) == 1
  for row in summary["examples"]:
    visits = len(row["visit_time_offsets"])
    assert row["visit_time_offsets"][-1] == 0.0
    cam = np.load(out / row["name"] / "gradcam.npy")
    pixels = np.load(out / row["name"] / "integrated_gradients.npy")
    assert cam.shape == (visits, 16, 16) and pixels.shape == (visits, 16, 16, 1)
    assert len(row["visit_integrated_gradients"]) == visits
    assert abs(row["visit_integrated_gradients_delta"]) < 1e-2
    assert os.path.getsize(out / row["name"] / "visits.png") > 0
  with pytest.raises(ValueError, match="gradient_shap is not run over the visits"):
    _explain(f"--workdir={workdir}", "--methods=gradient_shap", f"--out={tmp_path / 'x'}")


@pytest.fixture(scope="module")
def converted_resnet(tmp_path_factory):
  """A ResNet-18 (width 8, 5 classes) saved as ``convert resnet`` saves it."""
  directory = str(tmp_path_factory.mktemp("converted") / "resnet")
  model = ResNet(depth=18, base_width=8, num_classes=5)
  variables = nn.meta.unbox(
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), use_running_average=True)
  )
  leaves, tree = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  moved = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
  variables = {"params": jax.tree.unflatten(tree, moved), "batch_stats": variables["batch_stats"]}
  fields = {"depth": 18, "base_width": 8, "num_classes": 5}
  save_variables(directory, variables, {"kind": "resnet", "model_fields": fields})
  return directory, model, variables


def test_converted_backbone_with_npy_and_png(converted_resnet, tmp_path):
  directory, model, variables = converted_resnet
  array = np.random.default_rng(0).standard_normal((32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "a.npy", array)
  write_png(str(tmp_path / "b.png"), phantom(32, 32, label=False))
  out = tmp_path / "out"
  summary = _explain(
    f"--model=resnet:{directory}",
    f"--images={tmp_path / 'a.npy'},{tmp_path / 'b.png'}",
    "--methods=gradcam,guided_gradcam,gradient_shap",
    "--target=3",
    f"--out={out}",
  )
  assert [row["name"] for row in summary["examples"]] == ["image_000", "image_001"]
  assert summary["scores"] is None and all(row["target"] == 3 for row in summary["examples"])
  adapter = interpret.resnet_adapter(model, variables)
  expected = interpret.gradcam(adapter, jnp.asarray(array)[None], 3, "layer4")[0]
  np.testing.assert_allclose(np.load(out / "image_000" / "gradcam.npy"), expected, atol=1e-6)
  assert np.load(out / "image_001" / "gradient_shap.npy").shape == (32, 32, 3)
  assert "a.npy" not in json.dumps(summary) and "b.png" not in json.dumps(summary)


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    (["--methods=gradcam,lime"], "--methods: 'lime'; choose from gradcam,"),
    (["--layer=layer9"], "unknown layer 'layer9'"),
    (["--target=7"], "--target=7: the model has classes 0..4"),
  ],
)
def test_bad_requests_are_named(converted_resnet, tmp_path, flags, message):
  directory, _, _ = converted_resnet
  np.save(tmp_path / "a.npy", np.zeros((32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=message):
    _explain(
      f"--model=resnet:{directory}", f"--images={tmp_path / 'a.npy'}", f"--out={tmp_path}/o", *flags
    )
