"""FPN-MIL as a trainer task: image-level lesion classification from bags of patch features.

Two input modes, chosen by ``config.data.features_dir``:

* online (empty): images are cut into patches on the host (:mod:`mammojax.data.pipelines.mil`),
  and every step runs EfficientNet + FPN + the multi-scale MIL head. The encoder is frozen (its
  parameters never train and its batch norm uses running statistics) unless
  ``model.backbone_trainable``;
* offline: the per-scale FPN features written by ``python -m mammojax.extract_features`` are
  the instances; only the MIL head trains.

The loss is FPN-MIL's deep supervision (bag BCE plus ``loss.side_weight`` x each scale's side
BCE) with a positive-class weight. Evaluation reports the AUC (also per scale), balanced accuracy,
F1, sensitivity and specificity at ``eval.threshold`` and at the split's Youden threshold, and,
when the model has instance attention and the split has boxes, lesion detection from attention
heatmaps (recall / precision at IoU thresholds, mean IoU per heatmap; in the periodic evaluations
over at most ``eval.detection.max_examples`` positive examples). The report of ``python -m
mammojax.evaluate`` scores every positive example, names the threshold it used, and adds overlay
pictures. ``python -m mammojax.explain`` maps an online run's images beside its attention
heatmaps (:meth:`FPNMILTask.explain_dataset`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.atomic_files import write_json_atomic
from mammojax.data import records
from mammojax.data.pipelines import mil as mil_pipeline
from mammojax.data.specs import spec_from_config
from mammojax.interpret.scoring import boxes_to_mask
from mammojax.losses.mil import masked_deep_supervision_loss
from mammojax.metrics.classification import classification_metrics, roc_auc
from mammojax.metrics.detection import detection_report, heatmap_boxes
from mammojax.models.mil import heatmaps
from mammojax.models.mil.fpn_mil import FPNMIL, MultiScaleMILHead
from mammojax.nn.efficientnet import EfficientNet
from mammojax.nn.fpn import FPN
from mammojax.nn.set_transformer import num_inducing_points
from mammojax.train.task import AttributionTask
from mammojax.viz.overlays import save_overlay

PASSTHROUGH = ("label", "patch_coords", "patch_mask", "boxes", "num_boxes", "thumbnail")


def patch_settings(data: ml_collections.ConfigDict) -> mil_pipeline.PatchSettings:
  """The patching settings of a config's ``data`` section."""
  return spec_from_config(mil_pipeline.PatchSettings, data)


def build_backbone(model: ml_collections.ConfigDict) -> EfficientNet:
  b = model.backbone
  return EfficientNet(
    width=b.width,
    depth=b.depth,
    static_padding_size=tuple(b.static_padding_size) or None,
    drop_connect_rate=b.drop_connect_rate,
    batch_norm_momentum=b.batch_norm_momentum,
    depthwise_impl=b.depthwise_impl,
  )


def build_fpn(model: ml_collections.ConfigDict) -> FPN:
  return FPN(
    features=model.fpn.features, top_down=model.fpn.top_down, group_norm=model.fpn.group_norm
  )


class FPNMILTask(AttributionTask):
  """``config.task='fpn_mil'`` (or ``'mammojax.tasks.fpn_mil:FPNMILTask'``)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.offline = bool(config.data.get("features_dir"))
    if config.data.get("mode", "auto") == "offline" and not self.offline:
      raise ValueError(
        "this config trains on stored features: pass --config.data.features_dir="
        "DIR, written by python -m mammojax.extract_features"
      )
    self.scales = tuple(int(s) for s in config.model.head.scales)
    if self.offline:
      features = records.read_manifest(config.data.features_dir)["config"]
      missing = [s for s in self.scales if s not in features["scales"]]
      if missing:
        raise ValueError(
          f"{config.data.features_dir} holds scales {features['scales']}, the "
          f"config asks for {list(self.scales)} (missing {missing})"
        )
      self.image_size = tuple(features["image_size"])
      self.patch_size = int(features["patch_size"])
      self.num_patches = int(features["num_patches"])
      self.thumbnail_stride = int(features["thumbnail_stride"])
    else:
      self.settings = patch_settings(config.data)
      self.image_size, self.patch_size = self.settings.image_size, self.settings.patch_size
      self.num_patches = self.settings.num_patches
      self.thumbnail_stride = self.settings.thumbnail_stride
    head = self._head()
    if self.offline:
      self.model = FPNMIL(head=head)
    else:
      m = config.model
      self.model = FPNMIL(
        head=head,
        fpn=build_fpn(m),
        backbone=build_backbone(m),
        backbone_trainable=m.backbone_trainable,
        frozen_backbone_batch_stats=m.frozen_backbone_batch_stats,
      )
    self._data_dir = None
    self._pos_weight = None

  def _head(self) -> MultiScaleMILHead:
    h = self.config.model.head
    # FPN-MIL's rule on the bag size: patches x feature-map pixels per patch at each scale.
    num_inducing = tuple(h.num_inducing) or tuple(
      num_inducing_points(self.num_patches * math.ceil(self.patch_size / s) ** 2)
      for s in self.scales
    )
    return MultiScaleMILHead(
      scales=self.scales,
      encoder_type=h.encoder_type,
      encoder_features=h.encoder_features,
      encoder_dropout=h.encoder_dropout,
      num_encoder_blocks=h.num_encoder_blocks,
      encoder_heads=h.encoder_heads,
      num_inducing=num_inducing if h.encoder_type == "isab" else None,
      layer_norm=h.layer_norm,
      pooling_type=h.pooling_type,
      attention_hidden=h.attention_hidden,
      attention_dropout=h.attention_dropout,
      pma_heads=h.pma_heads,
      scale_aggregator=h.scale_aggregator,
      deep_supervision=h.deep_supervision,
      classifier_dropout=h.classifier_dropout,
    )

  # -- data -------------------------------------------------------------------------------------

  def image_dir(self) -> str:
    """The image dataset (ingested, or synthetic generated on first use)."""
    if self._data_dir is None:
      self._data_dir = mil_pipeline.resolve_image_dir(self.config.data)
    return self._data_dir

  def dataset(self, split: str) -> grain.MapDataset:
    if self.offline:
      return mil_pipeline.feature_dataset(
        self.config.data.features_dir, split, self.config.data.label
      )
    return mil_pipeline.patch_dataset(
      self.image_dir(), split, self.settings, self.config.data.label
    )

  def explain_dataset(self, split: str) -> grain.MapDataset:
    """:meth:`dataset`'s bags plus the whole normalised ``image`` ``[H, W, C]`` and
    ``region_masks`` ``[H, W]`` uint8 (the union of the label's boxes); online mode only."""
    if self.offline:
      raise ValueError(
        "explain maps pixels, so it needs FPN-MIL's online model (EfficientNet + FPN on image "
        "patches); this run trained its MIL head on stored features (data.features_dir): "
        "explain the online run those features were extracted from"
      )
    examples = mil_pipeline.patch_dataset(
      self.image_dir(), split, self.settings, self.config.data.label, with_image=True
    )
    return examples.map(_BoxRegions())

  def explain_options(self) -> dict[str, Any]:
    """The heatmaps' smoothing and per-patch normalisation (``eval.detection``)."""
    d = self.config.eval.detection
    return {"smooth_sigma": d.smooth_sigma, "patch_normalization": d.patch_normalization}

  def pos_weight(self) -> float:
    """``loss.pos_weight``, or negatives / positives of the training split when
    ``loss.pos_weight_from_data``."""
    if self._pos_weight is None:
      loss = self.config.loss
      if loss.pos_weight_from_data:
        directory = self.config.data.features_dir if self.offline else self.image_dir()
        negatives, positives = mil_pipeline.label_counts(directory, "train", self.config.data.label)
        if not positives:
          raise ValueError(
            f"the training split has no {self.config.data.label!r} positives; "
            "cannot set loss.pos_weight from the data"
          )
        self._pos_weight = negatives / positives
      else:
        self._pos_weight = float(loss.pos_weight)
    return self._pos_weight

  # -- model ------------------------------------------------------------------------------------

  def _inputs(self, batch):
    if not self.offline:
      return batch["patches"], batch["patch_mask"].astype(bool)
    instances, masks = {}, {}
    patch_mask = batch["patch_mask"].astype(bool)
    for s in self.scales:
      maps = batch[f"features_{s}"]
      b, p, h, w, f = maps.shape
      instances[s] = maps.reshape(b, p * h * w, f)
      masks[s] = jnp.repeat(patch_mask, h * w, axis=1)
    return instances, masks

  def _apply(self, variables, batch, train: bool, rng=None, mutable=False):
    rngs = {"dropout": rng} if rng is not None else None
    inputs, mask = self._inputs(batch)
    result = self.model.apply(variables, inputs, mask, train=train, rngs=rngs, mutable=mutable)
    out = result[0] if mutable else result
    if self.offline and "attention" in out:
      out["attention"] = {
        s: a.reshape(batch[f"features_{s}"].shape[:4]) for s, a in out["attention"].items()
      }
    return result

  def init_variables(self, rng, batch):
    inputs, mask = self._inputs(batch)
    return self.model.init({"params": rng, "dropout": rng}, inputs, mask, train=False)

  def frozen_param_patterns(self) -> tuple[str, ...]:
    if self.offline or self.config.model.backbone_trainable:
      return ()
    return ("backbone/.*",)

  def pretrained_checkpoints(self) -> dict[str, str]:
    checkpoint = self.config.model.get("backbone_checkpoint", "")
    return {"backbone": checkpoint} if checkpoint and not self.offline else {}

  def _updates_batch_stats(self, train: bool) -> bool:
    m = self.config.model
    return train and not self.offline and (m.backbone_trainable or m.frozen_backbone_batch_stats)

  def loss(self, params, model_state, batch, rng, train):
    variables = {"params": params, **model_state}
    if self._updates_batch_stats(train):
      out, updates = self._apply(variables, batch, True, rng, mutable=["batch_stats"])
      new_state = {**model_state, **updates}
    else:
      out, new_state = self._apply(variables, batch, train, rng), model_state
    total, parts = masked_deep_supervision_loss(
      out["logits"],
      out.get("scale_logits"),
      batch["label"],
      batch["_valid"],
      self.pos_weight(),
      self.config.loss.side_weight,
    )
    correct = ((out["logits"] > 0) == (batch["label"] > 0.5)).astype(jnp.float32)
    valid = batch["_valid"].astype(jnp.float32)
    parts["accuracy"] = jnp.sum(correct * valid) / jnp.maximum(valid.sum(), 1.0)
    return total, (parts, new_state)

  def predict(self, variables, batch):
    out = self._apply(variables, batch, False)
    result = {"prob": jax.nn.sigmoid(out["logits"].astype(jnp.float32))}
    if "scale_logits" in out:
      result["scale_prob"] = jax.nn.sigmoid(out["scale_logits"].astype(jnp.float32))
    if "scale_weights" in out:
      result["scale_weights"] = out["scale_weights"].astype(jnp.float32)
    for s, attention in out.get("attention", {}).items():
      result[f"attention_{s}"] = attention.astype(jnp.float32)
    return result

  def eval_passthrough_keys(self) -> tuple[str, ...]:
    return PASSTHROUGH

  def evaluate(self, predictions):
    """Classification metrics; with ``eval.detection.in_periodic_eval`` also the detection
    metrics (``detection_<heatmap>_<metric>``) of the first ``eval.detection.max_examples``
    positive examples with boxes."""
    metrics = self.classification(predictions)
    d = self.config.eval.detection
    if d.in_periodic_eval and has_detection_targets(predictions):
      metrics.update(detection_scalars(self.detection(predictions, max_examples=d.max_examples)))
    return metrics

  def classification(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC, metrics at ``eval.threshold`` and at the split's Youden threshold, per-scale AUCs
    and the positive rate."""
    labels = predictions["label"]
    metrics = classification_metrics(predictions["prob"], labels, self.config.eval.threshold)
    if "scale_prob" in predictions:
      for i, s in enumerate(self.scales):
        metrics[f"auc_scale_{s}"] = roc_auc(predictions["scale_prob"][:, i], labels)
    metrics["positive_rate"] = float(np.mean(labels > 0.5))
    return metrics

  # -- report -----------------------------------------------------------------------------------

  def example_heatmaps(
    self, predictions: dict[str, np.ndarray], index: int
  ) -> dict[Any, np.ndarray]:
    """Heatmaps [H, W] of one evaluated example: one per scale and ``'aggregated'``."""
    d = self.config.eval.detection
    maps = {}
    for s in self.scales:
      key = f"attention_{s}"
      if key not in predictions:
        raise ValueError(
          f"pooling_type={self.config.model.head.pooling_type!r} has no instance "
          "attention, so there are no heatmaps; use attention, gated-attention "
          "or pma"
        )
      maps[s] = heatmaps.scale_heatmap(
        predictions[key][index],
        predictions["patch_coords"][index],
        self.image_size,
        self.patch_size,
        patch_mask=predictions["patch_mask"][index],
        smooth_sigma=d.smooth_sigma,
        patch_normalization=d.patch_normalization,
      )
    weights = predictions["scale_weights"][index] if "scale_weights" in predictions else None
    maps["aggregated"] = heatmaps.aggregate_heatmaps(maps, weights)
    return maps

  def detection(
    self, predictions: dict[str, np.ndarray], out_dir: str | None = None, max_examples: int = 0
  ) -> dict[str, dict[str, float]]:
    """Detection metrics per heatmap (:func:`mammojax.metrics.detection.detection_report`) over
    the positive examples with boxes, the first ``max_examples`` of them (0 = all); with
    ``out_dir`` also overlay PNGs of the first ``eval.num_overlays``."""
    d = self.config.eval.detection
    box_args = dict(
      quantile=d.quantile,
      min_value=d.min_value,
      min_area=d.min_area,
      max_boxes=d.max_boxes,
      nms_iou=d.nms_iou,
    )
    chosen = np.flatnonzero((predictions["label"] > 0.5) & (predictions["num_boxes"] > 0))
    if max_examples:
      chosen = chosen[:max_examples]
    found: dict[Any, list[np.ndarray]] = {}
    truth = []
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
    for rank, i in enumerate(chosen):
      gt = predictions["boxes"][i][: int(predictions["num_boxes"][i])]
      truth.append(gt)
      maps = self.example_heatmaps(predictions, int(i))
      for name, heatmap in maps.items():
        found.setdefault(name, []).append(heatmap_boxes(heatmap, **box_args))
      if out_dir and rank < self.config.eval.num_overlays:
        stride = self.thumbnail_stride
        thumb = predictions["thumbnail"][i]
        scaled = lambda b: np.concatenate([b[:, :4] / stride, b[:, 4:]], axis=1)  # noqa: E731
        save_overlay(
          os.path.join(out_dir, f"overlay_{rank:03d}.png"),
          thumb,
          maps["aggregated"][::stride, ::stride],
          scaled(found["aggregated"][-1]),
          gt / stride,
          title=f"p={float(predictions['prob'][i]):.2f}",
        )
    iou_thresholds = tuple(d.iou_thresholds)
    return {
      str(name): detection_report(boxes, truth, iou_thresholds) for name, boxes in found.items()
    }

  def write_report(self, predictions, out_dir, examples=None):
    """``report.json`` (the decision threshold and where it came from, classification metrics,
    detection per heatmap over all positive examples with boxes) and ``overlays/*.png``."""
    source = self.config.eval.get("threshold_source", "eval.threshold of the config")
    report: dict[str, Any] = {
      "num_examples": int(len(predictions["prob"])),
      "threshold": {"value": float(self.config.eval.threshold), "source": source},
      "classification": self.classification(predictions),
    }
    if has_detection_targets(predictions):
      report["detection"] = self.detection(predictions, os.path.join(out_dir, "overlays"))
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "report.json"), _finite(report), indent=2)
    return report


class _BoxRegions(grain.transforms.Map):
  """The label's ``boxes`` (the first ``num_boxes``) -> ``region_masks`` ``[H, W]`` uint8."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    boxes = example["boxes"][: int(example["num_boxes"])]
    region = boxes_to_mask(boxes, example["image"].shape[:2]).astype(np.uint8)
    return {**example, "region_masks": region}


def has_detection_targets(predictions: dict[str, np.ndarray]) -> bool:
  """Whether the model has instance attention and some positive example has boxes."""
  return (
    any(k.startswith("attention_") for k in predictions)
    and "num_boxes" in predictions
    and bool(np.any((predictions["label"] > 0.5) & (predictions["num_boxes"] > 0)))
  )


def detection_scalars(reports: dict[str, dict[str, float]]) -> dict[str, float]:
  """``{heatmap: detection_report}`` -> flat ``detection_<heatmap>_<metric>`` of the mean IoU,
  recalls and precisions (the counts are left out)."""
  return {
    f"detection_{name}_{metric}": value
    for name, report in reports.items()
    for metric, value in report.items()
    if not metric.startswith("num_")
  }


def _finite(value: Any) -> Any:
  """NaN / inf -> None, so the report is strict JSON."""
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value
