"""Temporal-GradCam tasks end to end on the smoke cohort: backbone pretraining, feature
extraction, the temporal models, the end-to-end route, the sweep, and bad configs."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from shipped_configs import shipped_config, temporal_smoke_config

from mammojax import sweep, tasks
from mammojax.extract_features import extract_sequence_features
from mammojax.models.sequence_classifier import ImageClassifier
from mammojax.runs.restore import restore_run
from mammojax.tasks.temporal import classification_summary, frozen_backbone_patterns
from mammojax.tasks.temporal_features import backbone_subtree, ensure_features
from mammojax.train import trainer
from mammojax.train.init_state import load_pretrained


@pytest.fixture(scope="module")
def backbone_run(temporal_backbone_run):
  return temporal_backbone_run


def test_every_variant_loads_and_unknown_tokens_are_named():
  for backbone in ("resnet", "vit"):
    for model in ("image", "dnn", "gru", "transformer"):
      for extra in ("", ",smoke", ",paper", ",end_to_end", ",pretrain"):
        config = shipped_config("temporal", f"{backbone},{model}{extra}")
        assert config.model.backbone.kind == backbone
        assert config.data.seq_len == (1 if model == "image" or "pretrain" in extra else 3)
        tasks.build_task(config)
  assert shipped_config("temporal").model.temporal.kind == "gru"
  assert shipped_config("temporal", "paper").model.temporal.kind == "dnn"
  with pytest.raises(ValueError, match="unknown variant 'lstm'"):
    shipped_config("temporal", "resnet,lstm")
  with pytest.raises(ValueError, match="more than one backbone"):
    shipped_config("temporal", "resnet,vit")


def test_pretraining_stage_links_a_backbone(backbone_run):
  tmp, checkpoint = backbone_run
  assert checkpoint == os.path.join(str(tmp), "backbone_resnet")
  with open(os.path.join(checkpoint, "summary.json")) as f:
    assert json.load(f)["stopped"] == "steps"


@pytest.mark.parametrize("model", ["dnn", "gru", "transformer", "image"])
def test_temporal_models_train_on_extracted_features(backbone_run, model):
  tmp, checkpoint = backbone_run
  config = temporal_smoke_config(f"resnet,{model}", tmp)
  config.model.backbone_checkpoint = checkpoint
  config.data.features_dir = str(tmp / "features")
  task = tasks.build_task(config)
  summary = trainer.train_and_evaluate(config, str(tmp / model), task, show_progress=False)
  assert np.isfinite(summary["eval"]["eval/loss"])
  assert 0.0 <= summary["eval"]["eval/accuracy"] <= 1.0
  example = task.dataset("train")[0]
  assert example["features"].shape == (config.data.seq_len, 8 * 8)


def test_features_are_extracted_once_and_match_the_end_to_end_route(backbone_run):
  tmp, checkpoint = backbone_run
  config = temporal_smoke_config("resnet,gru", tmp)
  config.model.backbone_checkpoint = checkpoint
  config.data.features_dir = str(tmp / "features_e2e")
  feature_task = tasks.build_task(config)
  features_dir = feature_task.features_dir
  manifest = os.path.join(features_dir, "manifest.json")
  stamp = os.stat(manifest).st_mtime_ns
  assert tasks.build_task(config).features_dir == features_dir
  assert os.stat(manifest).st_mtime_ns == stamp  # reused, not rewritten

  e2e_config = temporal_smoke_config("resnet,gru,end_to_end", tmp)
  e2e_config.model.backbone_checkpoint = checkpoint
  e2e_task = tasks.build_task(e2e_config)
  image_batch = {k: v[None] for k, v in e2e_task.dataset("val")[0].items()}
  feature_batch = {k: v[None] for k, v in feature_task.dataset("val")[0].items()}
  np.testing.assert_array_equal(image_batch["sequence_mask"], feature_batch["sequence_mask"])
  variables = nn.meta.unbox(e2e_task.init_variables(jax.random.key(0), image_batch))
  loaded = backbone_subtree(load_pretrained(checkpoint), checkpoint)
  variables = {
    "params": {**variables["params"], "backbone": loaded["params"]},
    "batch_stats": {**variables.get("batch_stats", {}), "backbone": loaded["batch_stats"]},
  }
  temporal_variables = {"params": variables["params"]["temporal"]}
  from_pixels = e2e_task.predict(variables, image_batch)["prob"]
  from_features = feature_task.predict(temporal_variables, feature_batch)["prob"]
  np.testing.assert_allclose(np.asarray(from_pixels), np.asarray(from_features), atol=1e-5)


def test_end_to_end_task_trains_backbone_and_temporal_model(backbone_run):
  tmp, checkpoint = backbone_run
  config = temporal_smoke_config("resnet,transformer,end_to_end", tmp)
  config.model.backbone_checkpoint = checkpoint
  config.model.backbone_trainable = "all"
  summary = trainer.train_and_evaluate(
    config, str(tmp / "e2e"), tasks.build_task(config), show_progress=False
  )
  assert np.isfinite(summary["train"]["train/loss"])


def test_sweep_aggregates_seeds_and_resumes(backbone_run):
  tmp, _ = backbone_run
  workdir = str(tmp / "sweep")
  root = str(tmp / "data")
  arms = [
    "DNN=configs/temporal.py:resnet,dnn,smoke",
    "Linear=configs/temporal.py:resnet,image,smoke",
  ]
  overrides = [f"data.synthetic.root={root!r}"]
  results = sweep.run_sweep(workdir, arms, [175, 196], overrides=overrides, show_progress=False)
  assert set(results["arms"]) == {"DNN", "Linear"}
  summary = results["arms"]["DNN"]["summary"]
  accuracies = [r["metrics"]["accuracy"] for r in results["arms"]["DNN"]["runs"].values()]
  assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
  assert summary["accuracy"]["n"] == 2
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| DNN |" in table and "+-" in table
  done = os.path.join(workdir, "DNN", "seed_175", "test.json")
  stamp = os.stat(done).st_mtime_ns
  again = sweep.run_sweep(workdir, arms, [175, 196], overrides=overrides, show_progress=False)
  assert os.stat(done).st_mtime_ns == stamp
  assert again["arms"]["DNN"]["summary"] == summary


def test_reference_seeds_and_arm_parsing():
  assert sweep.reference_seeds(5) == [175, 196, 537, 502, 579]
  assert sweep.arm_directory("ResNet (seq 3)") == "ResNet_seq_3"
  with pytest.raises(ValueError, match="LABEL=configs"):
    sweep.parse_arm("configs/temporal.py")


def test_classification_summary_matches_sklearn():
  metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 50)
  logits = rng.normal(size=(50, 2)) + labels[:, None] * np.array([0.0, 1.0])
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
  out = classification_summary(probs, labels)
  assert out["auc"] == pytest.approx(metrics.roc_auc_score(labels, probs[:, 1]))
  assert out["f1"] == pytest.approx(metrics.f1_score(labels, probs.argmax(1)))
  assert out["loss"] == pytest.approx(metrics.log_loss(labels, probs))
  assert out["accuracy"] == pytest.approx(metrics.accuracy_score(labels, probs.argmax(1)))


def test_frozen_backbone_patterns():
  config = shipped_config("temporal", "resnet,image")
  assert frozen_backbone_patterns(config.model) == ("backbone/.*",)
  config.model.backbone_trainable = "last_stage"
  (pattern,) = frozen_backbone_patterns(config.model)
  assert re.fullmatch(pattern, "backbone/layer3_1/conv1/kernel")
  assert not re.fullmatch(pattern, "backbone/layer4_0/conv1/kernel")
  config = shipped_config("temporal", "vit,image")
  config.model.backbone_trainable = "last_stage"
  (pattern,) = frozen_backbone_patterns(config.model)
  assert re.fullmatch(pattern, "backbone/encoder_layer_2/attn/query/kernel")
  assert not re.fullmatch(pattern, "backbone/encoder_layer_3/attn/query/kernel")
  assert not re.fullmatch(pattern, "backbone/encoder_norm/scale")


def test_bad_settings_are_named(tmp_path):
  config = temporal_smoke_config("resnet,dnn", tmp_path)
  config.data.seq_len = 0
  with pytest.raises(ValueError, match="data.seq_len must be >= 1"):
    tasks.build_task(config)
  config = temporal_smoke_config("resnet,dnn", tmp_path)
  config.model.backbone_trainable = "some"
  with pytest.raises(ValueError, match="backbone_trainable"):
    tasks.build_task(config)
  config = temporal_smoke_config("resnet,dnn", tmp_path)
  with pytest.raises(ValueError, match="model.backbone_checkpoint is empty"):
    tasks.build_task(config).dataset("train")


def test_a_checkpoint_refuses_features_of_another_width(backbone_run):
  tmp, checkpoint = backbone_run
  config = temporal_smoke_config("resnet,dnn", tmp)
  config.model.backbone_checkpoint = checkpoint
  run_dir = str(tmp / "dnn_width")
  trainer.train_and_evaluate(config, run_dir, tasks.build_task(config), show_progress=False)

  # Features of a narrower backbone (zero weights suffice: only the width matters here).
  narrow = config.model.backbone.to_dict() | {"base_width": 4}
  image = jnp.zeros((1, 16, 16, 1))
  shapes = jax.eval_shape(
    lambda: ImageClassifier(narrow).init(jax.random.key(0), image, train=False)
  )
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))
  variables = backbone_subtree(zeros, "zeros")
  image_dir = tasks.build_task(config).image_dir
  narrow_dir = ensure_features(image_dir, narrow, variables, str(tmp / "narrow_features"))

  config.model.backbone_checkpoint = ""
  config.data.features_dir = narrow_dir
  with pytest.raises(ValueError, match=r"params/input/kernel is \[192, 64\] in the checkpoint"):
    restore_run(run_dir, config)


def test_extract_features_command_feeds_a_run_without_a_backbone(backbone_run):
  tmp, checkpoint = backbone_run
  config = temporal_smoke_config("resnet,dnn", tmp)
  out = extract_sequence_features(config, str(tmp / "extracted"), workdir=checkpoint)
  config.data.features_dir = out
  task = tasks.build_task(config)  # model.backbone_checkpoint stays empty
  assert task.features_dir == out
  assert task.dataset("train")[0]["features"].shape == (3, 64)
  config.data.features_dir = task.image_dir  # images, not features
  with pytest.raises(ValueError, match="not extracted sequence features"):
    tasks.build_task(config).dataset("train")
