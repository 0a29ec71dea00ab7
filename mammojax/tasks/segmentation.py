"""3-D segmentation as a trainer task: UNETR or a UNet on multi-contrast volumes.

``config.task='segmentation'``. The data are volume records (``python -m mammojax.ingest
--task=volume``, or the embedded synthetic brain volumes while ``data.dir`` is empty): the
contrasts ``data.contrasts`` become the input channels in that order, a contrast a subject lacks
is a channel of zeros (the seed's plain-UNETR route), and a subject without one of
``data.required_contrasts`` is an error naming it. Training sees random crops of
``data.crop_size`` centred on lesion or background voxels (MONAI's RandCropByPosNegLabel), flips,
in-plane quarter turns and intensity jitter; evaluation runs the model over every whole volume
with sliding windows of the crop size (``eval.overlap``, ``eval.blend``). The loss is MONAI's
Dice loss (``loss.kind='dice'``) or Dice + cross-entropy (``'dice_ce'``) on the softmax, with
MONAI's options under ``loss``. Subjects without a mask (``has_mask == 0``) never reach the loss or
the metrics.

Evaluation: Dice per subject and foreground class (NaN where the ground truth of a class is
empty; such subjects are skipped in the means and counted as ``dice_<class>_skipped``), their
means (``dice_mean`` is the best-checkpoint metric), and the mean Dice loss of the whole volumes.
``python -m mammojax.evaluate`` adds the 95% Hausdorff distance and the volume difference per
subject (``subjects.csv``) and figures of slices with the prediction and the ground truth.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from mammojax.atomic_files import atomic_write, write_json_atomic
from mammojax.data import records
from mammojax.data.pipelines import volume as volume_pipeline
from mammojax.data.synthetic import brain_volumes
from mammojax.losses.dice import dice_ce_loss, dice_loss
from mammojax.metrics import segmentation as seg_metrics
from mammojax.models.amae.adaptive_unetr import AdaptiveUNETR
from mammojax.models.segmentation.basic_unet import BasicUNet
from mammojax.models.segmentation.unetr import UNETR
from mammojax.nn.sliding_window import sliding_window_inference
from mammojax.tasks.amae import (
  SelectSlots,
  build_contrast_encoder,
  pretrained_encoder,
  slot_channels,
)
from mammojax.train.task import Task
from mammojax.viz.segmentation import save_segmentation_figure

MODEL_KINDS = ("unetr", "unet", "adaptive_unetr")
# Kinds that can start from a pretrained AMAE run (model.pretrained), and where its encoder goes.
PRETRAINED_PREFIX = {"adaptive_unetr": "encoder", "unetr": "vit"}
LOSS_KINDS = ("dice", "dice_ce")
PASSTHROUGH = ("label", "has_mask")


def build_model(
  model: ml_collections.ConfigDict, num_classes: int, crop: Sequence[int], num_contrasts: int
) -> nn.Module:
  """The network ``model.kind`` names, for ``num_classes`` logits on crops of sides ``crop`` of
  ``num_contrasts`` contrasts."""
  dtype = jnp.dtype(model.get("dtype", "float32"))
  if model.kind == "adaptive_unetr":
    return AdaptiveUNETR(
      out_channels=num_classes,
      encoder=build_contrast_encoder(model.encoder, num_contrasts, crop, dtype),
      feature_size=model.feature_size,
    )
  if model.kind == "unetr":
    return UNETR(
      out_channels=num_classes,
      img_size=tuple(int(s) for s in crop),
      feature_size=model.feature_size,
      hidden_size=model.hidden_size,
      mlp_dim=model.mlp_dim,
      num_heads=model.num_heads,
      dropout_rate=model.dropout_rate,
      qkv_bias=model.qkv_bias,
      remat=model.remat,
      dtype=dtype,
    )
  if model.kind == "unet":
    return BasicUNet(
      out_channels=num_classes,
      features=tuple(model.features),
      dropout_rate=model.dropout_rate,
      dtype=dtype,
    )
  raise ValueError(f"model.kind={model.kind!r}; use one of {MODEL_KINDS}")


def takes_presence(model: nn.Module, present: jax.Array | None = None) -> bool:
  """Whether ``model`` takes the contrast presence ``[B, C]`` beside its volumes; a ValueError
  when it does and ``present`` is None."""
  if not isinstance(model, AdaptiveUNETR):
    return False
  if present is None:
    raise ValueError(f"{type(model).__name__} needs the contrast presence [B, C] of its volumes")
  return True


def apply_model(
  model: nn.Module,
  variables: Any,
  volumes: jax.Array,
  present: jax.Array | None,
  *,
  train: bool = False,
  rngs: dict[str, jax.Array] | None = None,
) -> jax.Array:
  """``[B, *S, C] -> [B, *S, K]`` logits of any segmentation network; ``present`` ``[B, C]``
  reaches the networks that take it (:func:`takes_presence`)."""
  if takes_presence(model, present):
    return model.apply(variables, volumes, present, train=train, rngs=rngs)
  return model.apply(variables, volumes, train=train, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class WindowLogits:
  """The sliding-window predictor of a network: ``[n, *roi, C] -> [n, *roi, K]`` float32
  logits (with each window's volume's presence ``[n, C]`` for the networks that take it).
  Hashable by the network's fields, so one compiled program serves every call."""

  model: nn.Module

  def __call__(self, windows: jax.Array, variables: Any, *present: jax.Array) -> jax.Array:
    logits = apply_model(self.model, variables, windows, present[0] if present else None)
    return logits.astype(jnp.float32)


def volume_logits(
  model: nn.Module,
  variables: Any,
  volumes: jax.Array,
  roi: Sequence[int],
  *,
  overlap: float,
  blend: str,
  sw_batch_size: int,
  present: jax.Array | None = None,
) -> jax.Array:
  """Logits ``[B, D, H, W, K]`` of ``model`` over whole ``volumes [B, D, H, W, C]``, by sliding
  windows of sides ``roi`` (MONAI's sliding_window_inference: ``overlap``, ``blend``
  'gaussian' or 'constant', ``sw_batch_size`` windows per network call); ``present`` ``[B, C]``
  for the networks that take it."""
  return sliding_window_inference(
    volumes,
    tuple(int(s) for s in roi),
    sw_batch_size,
    WindowLogits(model),
    overlap=overlap,
    mode=blend,
    predictor_args=(variables,),
    example_args=(jnp.asarray(present),) if takes_presence(model, present) else (),
  )


class SegmentationTask(Task):
  """``config.task='segmentation'`` (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    data = config.data
    self.crop = tuple(int(s) for s in data.crop_size)
    if len(self.crop) != 3 or min(self.crop) < 1:
      raise ValueError(f"data.crop_size={tuple(data.crop_size)} must be three sides (D, H, W)")
    multiple = 16  # UNETR's patch and BasicUNet's four halvings
    if any(side % multiple for side in self.crop):
      raise ValueError(
        f"data.crop_size={self.crop}: every side must be a multiple of {multiple} for "
        f"model.kind={config.model.kind!r}; e.g. --config.data.crop_size="
        f"'{tuple(-(-s // multiple) * multiple for s in self.crop)}'"
      )
    self.contrasts = tuple(data.contrasts)
    missing = [c for c in data.required_contrasts if c not in self.contrasts]
    if not self.contrasts or missing:
      raise ValueError(
        f"data.contrasts={self.contrasts} must be non-empty and hold every required contrast "
        f"(data.required_contrasts lacks none of them; missing {missing})"
      )
    dropped = tuple(data.get("drop_contrasts", ()))
    wrong = [c for c in dropped if c not in self.contrasts or c in data.required_contrasts]
    if wrong:
      raise ValueError(
        f"data.drop_contrasts={list(dropped)}: {wrong} must be optional contrasts of "
        f"data.contrasts={list(self.contrasts)} (not in data.required_contrasts)"
      )
    if config.loss.kind not in LOSS_KINDS:
      raise ValueError(f"loss.kind={config.loss.kind!r}; use one of {LOSS_KINDS}")
    self.num_classes = int(config.model.num_classes)
    self.model = build_model(config.model, self.num_classes, self.crop, len(self.contrasts))
    pretrained = config.model.get("pretrained", "")
    if config.model.get("pretrained_required") and not pretrained:
      raise ValueError(
        "model.pretrained is empty, but this config fine-tunes a pretrained AMAE encoder: pass "
        "--config.model.pretrained=AMAE_RUN (a configs/amae.py workdir) or use the 'scratch' "
        "variant"
      )
    if pretrained and config.model.kind not in PRETRAINED_PREFIX:
      raise ValueError(
        f"model.pretrained={pretrained!r}: model.kind={config.model.kind!r} cannot start from "
        f"an AMAE encoder; use one of {sorted(PRETRAINED_PREFIX)} or leave model.pretrained empty"
      )

  # -- data -------------------------------------------------------------------------------------

  @functools.cached_property
  def directory(self) -> str:
    """``data.dir`` or the synthetic volumes (written once)."""
    return brain_volumes.dataset_dir(self.config.data)

  @functools.cached_property
  def manifest(self) -> dict[str, Any]:
    manifest = records.read_manifest(self.directory)["config"]
    names = list(manifest.get("contrasts", ()))
    unknown = [c for c in self.contrasts if c not in names]
    if unknown:
      raise ValueError(
        f"data.contrasts names {unknown}, which the records of {self.directory} do not hold; "
        f"they hold {names}"
      )
    classes = manifest.get("classes") or [f"class_{k}" for k in range(self.num_classes)]
    if len(classes) != self.num_classes:
      raise ValueError(
        f"model.num_classes={self.num_classes}, but the records of {self.directory} have "
        f"{len(classes)} classes {classes}; set --config.model.num_classes={len(classes)}"
      )
    return manifest

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.manifest.get("classes") or (f"class_{k}" for k in range(self.num_classes)))

  def dataset(self, split: str) -> grain.MapDataset:
    names = list(self.manifest["contrasts"])
    data = self.config.data
    select = SelectSlots(
      slot_channels(names, self.contrasts, self.directory),
      self.contrasts,
      required=tuple(data.required_contrasts),
      dropped=tuple(data.get("drop_contrasts", ())),
    )
    return volume_pipeline.volume_dataset(self.directory, split).map(select)

  def augmentations(self):
    a = self.config.data.augment
    return volume_pipeline.train_transforms(
      self.crop,
      pos=a.pos,
      neg=a.neg,
      flip_p=a.flip_p,
      rotate_p=a.rotate_p,
      scale=a.intensity_scale,
      shift=a.intensity_shift,
    )

  def eval_passthrough_keys(self):
    return PASSTHROUGH

  # -- model, loss, prediction ------------------------------------------------------------------

  def init_variables(self, rng, batch):
    crops = jnp.zeros((batch["volume"].shape[0], *self.crop, len(self.contrasts)), jnp.float32)
    present = jnp.ones((crops.shape[0], len(self.contrasts)), jnp.int32)
    rngs = {"params": rng, "dropout": rng}
    if takes_presence(self.model, present):
      return self.model.init(rngs, crops, present, train=False)
    return self.model.init(rngs, crops, train=False)

  def pretrained_checkpoints(self):
    pretrained = self.config.model.get("pretrained", "")
    return {PRETRAINED_PREFIX[self.config.model.kind]: pretrained} if pretrained else {}

  def select_pretrained(self, prefix, loaded, source):
    return pretrained_encoder(self.config, self.crop, loaded, source)

  def _loss_terms(self, logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    settings = self.config.loss
    options = dict(
      include_background=settings.include_background,
      softmax=True,
      squared_pred=settings.squared_pred,
      smooth_nr=settings.smooth_nr,
      smooth_dr=settings.smooth_dr,
      batch=settings.batch,
      valid=valid,
    )
    if settings.kind == "dice_ce":
      return dice_ce_loss(
        logits, labels, lambda_dice=settings.lambda_dice, lambda_ce=settings.lambda_ce, **options
      )
    return dice_loss(logits, labels, **options)

  def loss(self, params, model_state, batch, rng, train):
    variables = {"params": params, **model_state}
    logits = apply_model(
      self.model,
      variables,
      batch["volume"],
      batch.get("contrast_present"),
      train=train,
      rngs={"dropout": rng},
    )
    valid = batch["_valid"].astype(jnp.float32) * batch["has_mask"].astype(jnp.float32)
    loss = self._loss_terms(logits.astype(jnp.float32), batch["label"], valid)
    return loss, ({"loss": loss}, model_state)

  def logits(
    self, variables: Any, volumes: jax.Array, present: jax.Array | None = None
  ) -> jax.Array:
    """Whole-volume logits ``[B, D, H, W, K]`` of ``volumes [B, D, H, W, C]`` (contrast presence
    ``[B, C]``) by sliding windows of the crop size (``eval.overlap``, ``eval.blend``,
    ``eval.sw_batch_size``)."""
    e = self.config.eval
    return volume_logits(
      self.model,
      variables,
      volumes,
      self.crop,
      overlap=e.overlap,
      blend=e.blend,
      sw_batch_size=e.sw_batch_size,
      present=present,
    )

  def predict(self, variables, batch):
    logits = self.logits(variables, batch["volume"], batch.get("contrast_present"))
    per_class = dice_loss(
      logits,
      batch["label"],
      include_background=self.config.loss.include_background,
      softmax=True,
      reduction="none",
    )
    return {
      "prediction": jnp.argmax(logits, axis=-1).astype(jnp.uint8),
      "dice_loss": jnp.mean(per_class, axis=-1),
    }

  # -- metrics and reports ----------------------------------------------------------------------

  def _scored(self, predictions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The subjects with a mask: ``(prediction, label)`` ``[N, D, H, W]`` each."""
    keep = np.asarray(predictions["has_mask"]) > 0
    return np.asarray(predictions["prediction"])[keep], np.asarray(predictions["label"])[keep]

  def evaluate(self, predictions):
    pred, truth = self._scored(predictions)
    metrics: dict[str, float] = {"num_scored": float(len(pred))}
    if not len(pred):
      return metrics
    keep = np.asarray(predictions["has_mask"]) > 0
    metrics["loss"] = float(np.mean(np.asarray(predictions["dice_loss"])[keep]))
    per_subject = seg_metrics.dice_per_subject(
      pred, truth, self.num_classes, include_background=False
    )
    summary = seg_metrics.summarize_dice(per_subject, self.class_names[1:])
    metrics["dice_mean"] = summary["mean"]
    for name, stats in summary["classes"].items():
      metrics[f"dice_{name}"] = stats["mean"]
      metrics[f"dice_{name}_skipped"] = float(stats["n_skipped"])
    return metrics

  def write_report(self, predictions, out_dir, examples=None):
    """``report.json`` (Dice summary, mean HD95 and volume difference per class, with the
    number of subjects each skipped), ``subjects.csv`` (one row per subject and class) and, with
    the split's ``examples``, ``figures/subject_<i>.png`` for the first ``eval.report_figures``
    subjects."""
    os.makedirs(out_dir, exist_ok=True)
    report: dict[str, Any] = {"metrics": self.evaluate(predictions)}
    pred, truth = self._scored(predictions)
    rows = subject_rows(pred, truth, self.class_names)
    report["per_class"] = summarize_rows(rows, self.class_names[1:])
    # Which subjects, in which order, without naming them: python -m mammojax.compare pairs two
    # reports' rows only when their digests agree.
    report["truth_digest"] = hashlib.sha256(np.ascontiguousarray(truth, np.uint8)).hexdigest()
    report["notes"] = (
      "Dice is NaN for a subject whose ground truth lacks the class; such subjects are skipped "
      "in the means (counted in n_skipped). HD95 is in voxels of the records' grid, NaN when "
      "either mask is empty."
    )
    _write_rows(os.path.join(out_dir, "subjects.csv"), rows)
    if examples is not None:
      report["figures"] = self._figures(predictions, examples, os.path.join(out_dir, "figures"))
    write_json_atomic(os.path.join(out_dir, "report.json"), report, indent=2)
    return report

  def _figures(self, predictions, examples, out_dir: str) -> list[str]:
    count = min(int(self.config.eval.report_figures), len(predictions["prediction"]))
    paths = []
    for i in range(count):
      example = examples[i]
      truth = predictions["label"][i] if predictions["has_mask"][i] else None
      path = os.path.join(out_dir, f"subject_{i}.png")
      paths.append(
        save_segmentation_figure(
          path,
          np.asarray(example["volume"][..., 0], np.float32),
          np.asarray(predictions["prediction"][i]),
          truth,
          class_names=self.class_names,
          title=f"subject {i}, {self.contrasts[0]}",
        )
      )
    return paths


def subject_rows(
  pred: np.ndarray, truth: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, Any]]:
  """One row per subject and foreground class: Dice, HD95 (voxels) and the volume difference
  (voxels and relative) of ``pred`` against ``truth`` ``[N, D, H, W]``."""
  rows = []
  for subject, (p, t) in enumerate(zip(pred, truth)):
    dice = seg_metrics.dice_per_class(p, t, len(class_names), include_background=False)
    for k, name in enumerate(class_names[1:], start=1):
      difference, relative = seg_metrics.volume_difference(p == k, t == k, (1.0, 1.0, 1.0))
      rows.append(
        {
          "subject": subject,
          "class": name,
          "dice": float(dice[k - 1]),
          "hd95": float(seg_metrics.hausdorff95(p == k, t == k)),
          "volume_difference_voxels": float(difference) * 1000.0,  # ml of 1 mm voxels
          "volume_difference_relative": float(relative),
        }
      )
  return rows


def summarize_rows(rows: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
  """Per class: mean and count of the finite values of each metric, and how many were skipped."""
  out = {}
  for name in class_names:
    mine = [r for r in rows if r["class"] == name]
    stats = {}
    for metric in ("dice", "hd95", "volume_difference_voxels", "volume_difference_relative"):
      values = np.asarray([r[metric] for r in mine], np.float64)
      finite = values[np.isfinite(values)]
      stats[metric] = {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "n": int(finite.size),
        "n_skipped": int(values.size - finite.size),
      }
    out[str(name)] = stats
  return out


def _write_rows(path: str, rows: list[dict[str, Any]]) -> None:
  fields = ["subject", "class", "dice", "hd95", "volume_difference_voxels"]
  fields.append("volume_difference_relative")
  with atomic_write(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
