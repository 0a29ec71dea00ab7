"""FPN-MIL around the model: synthetic data, patching, heatmaps and detection, the trainer task,
offline feature extraction."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shipped_configs import shipped_config, smoke_config, smoke_training_run

from mammojax.data import records
from mammojax.data.pipelines import patching
from mammojax.data.synthetic import mil as synthetic_mil
from mammojax.evaluate import evaluate_checkpoint, parse_threshold
from mammojax.extract_features import encoder_variables, extract_features, make_pyramid_fn
from mammojax.losses.mil import deep_supervision_loss, masked_deep_supervision_loss
from mammojax.metrics.detection import box_iou, detection_report, heatmap_boxes
from mammojax.models.mil import heatmaps
from mammojax.tasks.fpn_mil import FPNMILTask, detection_scalars
from mammojax.train import trainer
from mammojax.train.metric_writer import read_metrics


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  return smoke_training_run("fpn_mil", tmp_path_factory)


# -- synthetic data --------------------------------------------------------------------------------


def test_synthetic_examples_are_deterministic_and_labelled():
  spec = synthetic_mil.SyntheticMILSpec(
    image_size=(96, 64), mass_radius=(4.0, 6.0), calc_cluster_radius=5.0
  )
  a = synthetic_mil.generate_example(spec, "train", 3)
  b = synthetic_mil.generate_example(spec, "train", 3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["image"], synthetic_mil.generate_example(spec, "val", 3)["image"])
  seen = set()
  for i in range(24):
    e = synthetic_mil.generate_example(spec, "train", i)
    assert e["image"].shape == (96, 64) and e["image"].dtype == np.uint16
    # One box per finding, labelled with the finding's index; boxes inside the image.
    assert sorted(e["box_labels"].tolist()) == np.flatnonzero(e["labels"]).tolist()
    for x0, y0, x1, y1 in e["boxes"]:
      assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 96
      # The finding is brighter than the breast around it.
      inside = e["image"][int(y0) : int(y1), int(x0) : int(x1)].max()
      assert inside > np.median(e["image"][e["image"] > 0])
    seen.add(tuple(e["labels"]))
  assert len(seen) == 4  # all label combinations occur


# -- patching ------------------------------------------------------------------------------------


def test_patch_grid_covers_the_image_and_drops_background():
  np.testing.assert_array_equal(patching.patch_starts(10, 4, 0.0), [0, 4, 6])
  np.testing.assert_array_equal(patching.patch_starts(10, 4, 0.5), [0, 2, 4, 6])
  np.testing.assert_array_equal(patching.patch_starts(3, 4, 0.0), [0])
  image = np.zeros((8, 12), np.float32)
  image[:, :5] = 1.0  # breast on the left: the patch at column 8 is background
  out = patching.extract_patches(image, 4, 0.0)
  np.testing.assert_array_equal(out.coords, [[0, 0], [0, 4], [4, 0], [4, 4]])
  np.testing.assert_array_equal(out.patches[1], image[0:4, 4:8])
  # min_foreground 0.3: the patch with 1 of 4 columns of breast goes too.
  np.testing.assert_array_equal(
    patching.extract_patches(image, 4, 0.0, min_foreground=0.3).coords, [[0, 0], [4, 0]]
  )
  with pytest.raises(ValueError, match="overlap"):
    patching.patch_starts(10, 4, 1.0)


def test_patch_round_trip_and_overlap_averaging():
  rng = np.random.default_rng(0)
  image = rng.random((13, 11)).astype(np.float32) + 0.1
  out = patching.extract_patches(image, 5, 0.4)
  back, count = patching.accumulate_patch_maps(out.patches, out.coords, image.shape)
  np.testing.assert_allclose(back, image, rtol=1e-6)
  assert count.min() >= 1 and count.max() > 1
  # Two overlapping constant maps average where they overlap.
  maps = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)])
  avg, count = patching.accumulate_patch_maps(maps, np.array([[0, 0], [0, 2]]), (4, 8))
  np.testing.assert_allclose(avg[0], [1, 1, 2, 2, 3, 3, 0, 0])
  np.testing.assert_array_equal(count[0], [1, 1, 2, 2, 1, 1, 0, 0])


# -- heatmaps and detection ------------------------------------------------------------------------


def test_heatmap_to_boxes_to_iou_on_a_hand_made_case():
  # Two patches of 8 px side 4x4 attention each; one hot instance in the second patch.
  attention = np.zeros((2, 4, 4))
  attention[1, 1:3, 1:3] = 1.0
  coords = np.array([[0, 0], [0, 8]])
  heat = heatmaps.scale_heatmap(attention, coords, (8, 16), 8)
  assert heat.shape == (8, 16) and heat.max() == pytest.approx(1.0) and heat.min() == 0.0
  assert heat[:, :8].max() == 0.0  # the cold patch stays cold
  boxes = heatmap_boxes(heat, quantile=0.5, min_value=0.5, min_area=1)
  assert boxes.shape == (1, 5)
  x0, y0, x1, y1, score = boxes[0]
  # Bilinear (aligned corners) 4 -> 8 samples the map at i * 3 / 7: pixels 2..5 of each axis
  # read 0.86 or 1 (pixels 1 and 6 read 0.43), and 0.86^2 > 0.5, so the box is rows / cols
  # 2..5 of the second patch (x offset 8).
  assert (x0, y0, x1, y1) == (10, 2, 14, 6) and score > 0
  iou = box_iou(boxes[:, :4], np.array([[10, 2, 14, 6], [10, 2, 18, 6], [0, 0, 2, 2]]))
  np.testing.assert_allclose(iou, [[1.0, 0.5, 0.0]])
  # A padded patch is ignored even if its attention is high.
  masked = heatmaps.scale_heatmap(
    np.stack([attention[1], attention[1]]), coords, (8, 16), 8, patch_mask=np.array([False, True])
  )
  assert masked[:, :8].max() == 0.0


def test_boxes_small_components_nms_and_aggregation():
  heat = np.zeros((20, 20))
  heat[2:6, 2:6] = 1.0  # 16 px
  heat[10:12, 10:11] = 0.9  # 2 px: below min_area
  boxes = heatmap_boxes(heat, quantile=0.0, min_value=0.5, min_area=4)
  np.testing.assert_array_equal(boxes[:, :4], [[2, 2, 6, 6]])
  assert boxes[0, 4] == pytest.approx(16.0)
  a, b = np.zeros((4, 4)), np.ones((4, 4))
  np.testing.assert_allclose(heatmaps.aggregate_heatmaps({16: a, 32: b}, [0.5, 1.5]), 0.75 * b)
  np.testing.assert_allclose(heatmaps.aggregate_heatmaps({16: a, 32: b}), 0.5 * b)
  with pytest.raises(ValueError, match="one non-negative weight per heatmap"):
    heatmaps.aggregate_heatmaps({16: a}, [0.5, 0.5])


def test_detection_report_by_hand():
  truth = [
    np.array([[0, 0, 10, 10]]),
    np.array([[0, 0, 10, 10], [20, 20, 30, 30]]),
    np.zeros((0, 4)),
  ]
  predicted = [
    np.array([[0, 0, 10, 5, 1.0]]),  # IoU 0.5
    np.array([[20, 20, 30, 30, 2.0], [50, 50, 60, 60, 1.0]]),  # 1.0 and a miss
    np.array([[0, 0, 5, 5, 1.0]]),
  ]  # no truth: skipped
  report = detection_report(predicted, truth, (0.25, 0.75))
  assert report["num_images"] == 2 and report["num_truth"] == 3 and report["num_predicted"] == 3
  assert report["mean_iou"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
  assert report["recall_iou0.25"] == pytest.approx(2 / 3)
  assert report["recall_iou0.75"] == pytest.approx(1 / 3)
  assert report["precision_iou0.25"] == pytest.approx(2 / 3)
  assert report["precision_iou0.75"] == pytest.approx(1 / 3)


def test_masked_deep_supervision_loss():
  logits, sides = jnp.array([0.3, -1.0, 2.0]), jnp.array([[0.1, 0.2], [-0.3, 0.4], [1.0, 0.0]])
  labels = jnp.array([1.0, 0.0, 1.0])
  total, _ = masked_deep_supervision_loss(logits, sides, labels, jnp.ones(3), 2.5, 1.0)
  np.testing.assert_allclose(total, deep_supervision_loss(logits, sides, labels, 2.5), rtol=1e-6)
  # A padded example changes nothing.
  padded, _ = masked_deep_supervision_loss(
    jnp.append(logits, 9.0),
    jnp.concatenate([sides, jnp.ones((1, 2))]),
    jnp.append(labels, 0.0),
    jnp.array([1, 1, 1, 0]),
    2.5,
    1.0,
  )
  np.testing.assert_allclose(padded, total, rtol=1e-6)


def _fake_predictions(task: FPNMILTask, num_examples: int) -> dict[str, np.ndarray]:
  """Evaluation outputs of ``num_examples`` positives with a box in the top-left corner and
  attention on the top-left instance of the first patch at every scale."""
  rows = patching.patch_starts(task.image_size[0], task.patch_size, 0.0)
  cols = patching.patch_starts(task.image_size[1], task.patch_size, 0.0)
  coords = np.array([(r, c) for r in rows for c in cols])
  n, p = num_examples, len(coords)
  predictions = {
    "prob": np.full(n, 0.9),
    "label": np.ones(n),
    "patch_coords": np.stack([coords] * n),
    "patch_mask": np.ones((n, p), bool),
    "scale_weights": np.ones((n, 3)) / 3,
    "num_boxes": np.ones(n),
    "boxes": np.tile([[0.0, 0.0, 8.0, 8.0]], (n, 2, 1)),
  }
  for s in task.scales:
    side = -(-task.patch_size // s)
    attention = np.zeros((n, p, side, side))
    attention[:, 0, 0, 0] = 1.0
    predictions[f"attention_{s}"] = attention
  return predictions


def test_periodic_evaluation_scores_detection_of_a_capped_number_of_examples(tmp_path):
  config = smoke_config("fpn_mil", tmp_path)
  config.eval.detection.max_examples = 2
  task = FPNMILTask(config)
  predictions = _fake_predictions(task, 3)
  metrics = task.evaluate(predictions)
  capped = task.detection(predictions, max_examples=2)
  assert capped["aggregated"]["num_images"] == 2
  assert task.detection(predictions)["aggregated"]["num_images"] == 3
  detection = {k: v for k, v in metrics.items() if k.startswith("detection_")}
  np.testing.assert_equal(detection, detection_scalars(capped))  # NaN where no box was found
  assert {
    "detection_aggregated_mean_iou",
    "detection_16_recall_iou0.1",
    "detection_32_precision_iou0.5",
  } <= set(detection)
  # The attention peak is the box's corner: the stride-16 heatmap finds it.
  assert detection["detection_16_recall_iou0.1"] == 1.0
  assert all(isinstance(v, float) for v in detection.values())
  config.eval.detection.in_periodic_eval = False
  assert not any(k.startswith("detection_") for k in task.evaluate(predictions))


def test_threshold_flag_parsing():
  assert parse_threshold("0.3") == 0.3
  assert parse_threshold("youden:val") == "val"
  for bad in ("youden:", "val", "youden"):
    with pytest.raises(ValueError, match="youden:SPLIT"):
      parse_threshold(bad)


# -- the task through the trainer ------------------------------------------------------------------


def test_smoke_training_logs_classification_metrics(smoke_run):
  config, workdir, summary, _ = smoke_run
  assert summary["step"] == config.train.steps
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval/auc" in r]
  assert evals and evals[-1]["step"] == config.train.steps
  for key in (
    "eval/auc",
    "eval/balanced_accuracy",
    "eval/f1",
    "eval/sensitivity",
    "eval/specificity",
    "eval/youden_threshold",
    "eval/balanced_accuracy_youden",
    "eval/f1_youden",
    "eval/sensitivity_youden",
    "eval/specificity_youden",
    "eval/detection_aggregated_mean_iou",
    "eval/detection_16_recall_iou0.25",
    "eval/detection_128_precision_iou0.5",
  ):
    assert key in evals[-1]
  assert 0.0 <= evals[-1]["eval/balanced_accuracy"] <= 1.0
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == config.train.steps and all(np.isfinite(losses))


def test_frozen_backbone_and_trainable_batch_norm_paths(tmp_path):
  config = smoke_config("fpn_mil", tmp_path)
  task = FPNMILTask(config)
  assert task.frozen_param_patterns() == ("backbone/.*",)
  example = task.dataset("train")[0]
  assert example["patches"].shape == (task.num_patches, 32, 32, 1)
  assert example["patch_mask"].dtype == bool and example["patch_mask"].any()
  config.model.backbone_trainable = True
  trainable = FPNMILTask(config)
  assert trainable.frozen_param_patterns() == ()
  batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
  batch["_valid"] = jnp.ones(1, jnp.int32)
  variables = jax.eval_shape(lambda r: trainable.init_variables(r, batch), jax.random.key(0))
  state = {"batch_stats": variables["batch_stats"]}
  loss, (metrics, new_state) = jax.eval_shape(
    lambda p, s: trainable.loss(p, s, batch, jax.random.key(1), True), variables["params"], state
  )
  assert loss.shape == () and "loss_sides" in metrics
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


@pytest.mark.parametrize("variant", ["calc", "mass"])
def test_reference_variants_build_their_heads(variant, tmp_path):
  reference = shipped_config("fpn_mil", variant)
  assert reference.model.head.encoder_type == ("isab" if variant == "calc" else "mlp")
  assert reference.model.head.pooling_type == ("pma" if variant == "calc" else "gated-attention")
  assert reference.model.backbone.static_padding_size == (260, 260)
  assert not reference.model.backbone_trainable
  # The same head on the smoke data: ISAB inducing points follow the bag size.
  config = smoke_config("fpn_mil", tmp_path)
  config.model.head = reference.model.head
  config.model.head.encoder_features = config.model.head.attention_hidden = 8
  task = FPNMILTask(config)
  if variant == "calc":
    # 4 patches of 32 px: 16 instances at stride 16 -> ceil(10 log10 16) = 13; 4 -> 4; 4 -> 4.
    assert task.model.head.num_inducing == (13, 4, 4)
  example = task.dataset("train")[0]
  batch = {k: jnp.asarray(v)[None] for k, v in example.items()}
  variables = jax.eval_shape(lambda r: task.init_variables(r, batch), jax.random.key(0))
  out = jax.eval_shape(lambda v: task.predict(v, batch), variables)
  assert out["attention_16"].shape == (1, task.num_patches, 2, 2)
  assert out["scale_weights"].shape == (1, 3)


def test_offline_variant_needs_features():
  with pytest.raises(ValueError, match="features_dir"):
    FPNMILTask(shipped_config("fpn_mil", "offline"))


def test_evaluate_report_has_detection_and_overlays(smoke_run, tmp_path):
  config, workdir, _, _ = smoke_run
  out = str(tmp_path / "report")
  result = evaluate_checkpoint(config, workdir, "latest", "test", out, threshold="0.3")

  def no_nan(token):
    raise AssertionError(f"report.json holds {token}; it must be strict JSON")

  with open(os.path.join(out, "report.json")) as f:
    report = json.load(f, parse_constant=no_nan)
  assert report["num_examples"] == result["report"]["num_examples"]
  assert report["num_examples"] == config.data.synthetic.num_test
  assert {"auc", "balanced_accuracy", "f1", "youden_threshold"} <= set(report["classification"])
  assert report["threshold"] == {"value": 0.3, "source": "--threshold"}
  assert config.eval.threshold == 0.5  # the caller's config is left alone
  assert set(report["detection"]) == {"16", "32", "128", "aggregated"}
  assert "recall_iou0.5" in report["detection"]["aggregated"]
  overlays = sorted(os.listdir(os.path.join(out, "overlays")))
  assert overlays and os.path.getsize(os.path.join(out, "overlays", overlays[0])) > 1000


def test_evaluate_applies_the_youden_threshold_of_another_split(smoke_run, tmp_path):
  config, workdir, _, _ = smoke_run
  # Chosen on val and applied to val: the metrics at the threshold are the Youden ones.
  report = evaluate_checkpoint(
    config, workdir, "latest", "val", str(tmp_path / "report"), threshold="youden:val"
  )["report"]
  classification = report["classification"]
  assert report["threshold"]["value"] == pytest.approx(classification["youden_threshold"])
  assert "Youden" in report["threshold"]["source"] and "val" in report["threshold"]["source"]
  for name in ("balanced_accuracy", "f1", "sensitivity", "specificity"):
    assert classification[name] == pytest.approx(classification[f"{name}_youden"])


def test_extract_features_round_trip_and_offline_training(smoke_run):
  config, workdir, _, tmp_path = smoke_run
  out = str(tmp_path / "features")
  extract_features(config, out, workdir, batch_size=4)
  manifest = records.read_manifest(out)
  assert manifest["config"]["scales"] == [16, 32, 128]
  assert manifest["splits"]["val"]["count"] == config.data.synthetic.num_val
  mtime = os.path.getmtime(os.path.join(out, records.MANIFEST))
  extract_features(config, out, workdir, batch_size=4)  # up to date: nothing rewritten
  assert os.path.getmtime(os.path.join(out, records.MANIFEST)) == mtime

  offline = smoke_config("fpn_mil", tmp_path)
  offline.data.features_dir = out
  task = FPNMILTask(offline)
  online = FPNMILTask(config)
  stored, image = task.dataset("val")[1], online.dataset("val")[1]
  for key in ("patch_mask", "patch_coords", "label", "num_boxes", "boxes"):
    np.testing.assert_array_equal(stored[key], image[key])
  # The stored features are the trained encoder + FPN (from the run) applied to the patches.
  assert stored["features_16"].shape == (online.num_patches, 2, 2, config.model.fpn.features)
  assert stored["features_128"].shape == (online.num_patches, 1, 1, config.model.fpn.features)
  variables = encoder_variables(online, image, workdir)
  levels = make_pyramid_fn(config.model, (16, 32, 128))(variables, image["patches"][None])
  for s in (16, 32, 128):
    np.testing.assert_allclose(stored[f"features_{s}"], levels[s][0], atol=1e-5)

  summary = trainer.train_and_evaluate(
    offline, str(tmp_path / "offline_run"), task, show_progress=False
  )
  assert summary["step"] == offline.train.steps
  assert "eval/auc" in summary["eval"]
