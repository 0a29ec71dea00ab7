"""Temporal-GradCam as trainer tasks: an image classifier, and temporal classifiers over each
patient's image sequence (on frozen features, or end to end from pixels).

* ``image_classifier`` (:class:`ImageClassifierTask`): backbone + linear head on single images;
  the backbone frozen (the seed's setting), its last stage fine-tuned, or all of it trained
  (``model.backbone_trainable``: ``'none'`` | ``'last_stage'`` | ``'all'``). With
  ``data.source='pretrain'`` it trains a backbone on the synthetic pretraining cohort (the
  stand-in for ImageNet weights).
* ``temporal`` (:class:`TemporalFeatureTask`): a temporal model (``model.temporal.kind``:
  ``image`` | ``dnn`` | ``gru`` | ``transformer``) over the newest ``data.seq_len`` per-image
  features of the frozen backbone ``model.backbone_checkpoint``, extracted once
  (:mod:`mammojax.tasks.temporal_features`).
* ``temporal_end_to_end`` (:class:`EndToEndTemporalTask`): the same temporal model on features
  computed inside the step, so the backbone can train with it and attribution reaches the pixels
  of every image of a sequence.

Every task reads the sequence records of ``data.dir`` (``mammojax.ingest --task=sequence``) or of
the embedded synthetic cohort, with the patient-level split stored there
(``data.split_seed = -1``) or re-drawn from ``data.split_seed`` (stratified by patient label).
Loss: softmax cross-entropy. Evaluation: the mean loss, accuracy, and for two classes AUC on the
class-1 probability, F1, sensitivity and specificity at probability 0.5.
"""

from __future__ import annotations

import abc
import functools
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mammojax.data.constants import default_data_root
from mammojax.data.pipelines import sequence as sequence_pipeline
from mammojax.data.synthetic import brain_sequences
from mammojax.metrics.classification import classification_metrics
from mammojax.models import backbones
from mammojax.models.sequence_classifier import (
  ImageClassifier,
  SequenceClassifier,
  temporal_module,
)
from mammojax.tasks.temporal_features import FEATURES_KIND, backbone_subtree, ensure_features
from mammojax.train.init_state import load_pretrained
from mammojax.train.task import AttributionTask, Task

BACKBONE_TRAINABLE = ("none", "last_stage", "all")
PASSTHROUGH = ("label",)


class _SequenceTask(Task):
  """Data, loss, prediction and metrics shared by the three tasks."""

  # Record fields the model reads (besides 'label').
  inputs: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.data.seq_len < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {config.data.seq_len}")
    trainable = config.model.get("backbone_trainable", "none")
    if trainable not in BACKBONE_TRAINABLE:
      raise ValueError(f"model.backbone_trainable={trainable!r}; use one of {BACKBONE_TRAINABLE}")

  # -- data -------------------------------------------------------------------------------------

  @functools.cached_property
  def image_dir(self) -> str:
    """The sequence dataset of images: ``data.dir`` or the synthetic cohort (written once)."""
    data = self.config.data
    if data.dir:
      return data.dir
    root = data.synthetic.root or default_data_root()
    spec = synthetic_spec(data.synthetic)
    if data.get("source", "cohort") == "pretrain":
      return brain_sequences.write_pretrain_dataset(root, spec)
    return brain_sequences.write_dataset(root, spec)

  def _examples(
    self, directory: str, split: str, seq_len: int, pixel_norm=None, optional=()
  ) -> grain.MapDataset:
    """The split's sequences with the model's inputs, the label and any ``optional`` field the
    records have."""
    data = self.config.data
    return sequence_pipeline.sequence_dataset(
      directory,
      split,
      seq_len,
      padding=data.padding,
      resplit_seed=None if data.split_seed < 0 else int(data.split_seed),
      fractions=tuple(tuple(f) for f in data.fractions),
      normalisation=pixel_norm,
    ).map(_Select(self.inputs, optional))

  def _pixel_norm(self) -> tuple[float, float]:
    config = sequence_pipeline.manifest_config(self.image_dir)
    return backbones.pipeline_normalisation(
      self.config.model.backbone.input_scaling,
      config.get("pixel_mean", 0.0),
      config.get("pixel_std", 1.0),
    )

  # -- loss and metrics -------------------------------------------------------------------------

  def _logits(self, variables, batch, train: bool, rng=None, mutable=False):
    """``[B, K]`` logits of the model on the batch's :attr:`inputs`, in order (with the updated
    collections when ``mutable``)."""
    rngs = {"dropout": rng} if rng is not None else None
    inputs = [batch[name] for name in self.inputs]
    return self.model.apply(variables, *inputs, train=train, rngs=rngs, mutable=mutable)

  def init_variables(self, rng, batch):
    inputs = [batch[name] for name in self.inputs]
    return self.model.init({"params": rng, "dropout": rng}, *inputs, train=False)

  def _updates_batch_stats(self, train: bool) -> bool:
    return train

  def loss(self, params, model_state, batch, rng, train):
    variables = {"params": params, **model_state}
    if self._updates_batch_stats(train) and "batch_stats" in model_state:
      logits, updates = self._logits(variables, batch, True, rng, mutable=["batch_stats"])
      new_state = {**model_state, **updates}
    else:
      logits, new_state = self._logits(variables, batch, train, rng), model_state
    labels = batch["label"].astype(jnp.int32)
    valid = batch["_valid"].astype(jnp.float32)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    count = jnp.maximum(valid.sum(), 1.0)
    loss = jnp.sum(per_example * valid) / count
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return loss, ({"loss": loss, "accuracy": jnp.sum(correct * valid) / count}, new_state)

  def predict(self, variables, batch):
    return {"prob": jax.nn.softmax(self._logits(variables, batch, False), axis=-1)}

  def eval_passthrough_keys(self) -> tuple[str, ...]:
    return PASSTHROUGH

  def evaluate(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    return classification_summary(predictions["prob"], predictions["label"])


class _PixelTask(_SequenceTask, AttributionTask):
  """A task whose model runs the backbone on pixels: the backbone's freezing and loading, and
  the examples attribution maps are made of."""

  @abc.abstractmethod
  def _pixel_examples(self, split: str, optional: tuple[str, ...]) -> grain.MapDataset:
    """The split's examples as the model takes them, with the ``optional`` record fields."""

  def dataset(self, split: str) -> grain.MapDataset:
    return self._pixel_examples(split, ())

  def explain_dataset(self, split: str) -> grain.MapDataset:
    """``region_masks`` are ``[H, W]`` or ``[L, H, W]`` uint8 (the synthetic cohort's
    ventricles, the region whose change carries the label)."""
    return self._pixel_examples(split, ("region_masks", "time_offsets"))

  def frozen_param_patterns(self) -> tuple[str, ...]:
    return frozen_backbone_patterns(self.config.model)

  def pretrained_checkpoints(self) -> dict[str, str]:
    path = self.config.model.backbone_checkpoint
    return {"backbone": path} if path else {}

  def select_pretrained(self, prefix, loaded, source):
    return backbone_subtree(loaded, source) if prefix == "backbone" else loaded


class ImageClassifierTask(_PixelTask):
  """Backbone + linear head on single images (``config.task='image_classifier'``)."""

  inputs = ("images",)

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = config.model
    self.model = ImageClassifier(
      backbone=m.backbone.to_dict(),
      num_classes=m.num_classes,
      backbone_trainable=m.backbone_trainable == "all",
    )

  def _pixel_examples(self, split: str, optional: tuple[str, ...]) -> grain.MapDataset:
    examples = self._examples(self.image_dir, split, 1, self._pixel_norm(), optional)
    return examples.map(_CurrentImage())

  def _updates_batch_stats(self, train: bool) -> bool:
    # Only the backbone has BatchNorm here; one that does not train keeps its statistics.
    return train and self.config.model.backbone_trainable == "all"


class TemporalFeatureTask(_SequenceTask):
  """A temporal model over frozen per-image features (``config.task='temporal'``)."""

  inputs = ("features", "sequence_mask", "time_offsets")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model = temporal_module(config.model.temporal.to_dict(), config.model.num_classes)

  @functools.cached_property
  def features_dir(self) -> str:
    """The extracted features (computed on first use, then reused)."""
    m = self.config.model
    given = self.config.data.features_dir
    if given and not m.backbone_checkpoint:
      return check_features_dir(given)  # extracted beforehand (python -m mammojax.extract_features)
    if not m.backbone_checkpoint:
      raise ValueError(
        "model.backbone_checkpoint is empty: set it to a converted backbone "
        "(python -m mammojax.convert resnet|vit FILE --out=DIR) or a trained image_classifier "
        "run, or keep the config's pretrain stage"
      )
    variables = backbone_subtree(load_pretrained(m.backbone_checkpoint), m.backbone_checkpoint)
    return ensure_features(
      self.image_dir, m.backbone, variables, out_dir=self.config.data.features_dir
    )

  def dataset(self, split: str) -> grain.MapDataset:
    return self._examples(self.features_dir, split, self.config.data.seq_len)


class EndToEndTemporalTask(_PixelTask):
  """Backbone and temporal model in one step (``config.task='temporal_end_to_end'``)."""

  inputs = ("images", "sequence_mask", "time_offsets")

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = config.model
    self.model = SequenceClassifier(
      backbone=m.backbone.to_dict(),
      temporal=m.temporal.to_dict(),
      num_classes=m.num_classes,
      backbone_trainable=m.backbone_trainable == "all",
    )

  def _pixel_examples(self, split: str, optional: tuple[str, ...]) -> grain.MapDataset:
    seq_len = self.config.data.seq_len
    return self._examples(self.image_dir, split, seq_len, self._pixel_norm(), optional)


def check_features_dir(directory: str) -> str:
  """``directory`` if it holds extracted sequence features, else a ValueError saying so."""
  config = sequence_pipeline.manifest_config(directory)
  if config.get("kind") != FEATURES_KIND:
    raise ValueError(
      f"data.features_dir={directory} holds {config.get('kind')!r} records, not extracted "
      "sequence features (python -m mammojax.extract_features --config=configs/temporal.py ...)"
    )
  return directory


def frozen_backbone_patterns(model: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Freeze regexes for ``model.backbone_trainable``: all backbone parameters (``'none'``), all
  but the last stage (``'last_stage'``: ResNet ``layer4``, ViT the last block and final norm),
  or none (``'all'``)."""
  if model.backbone_trainable == "all":
    return ()
  if model.backbone_trainable == "none":
    return ("backbone/.*",)
  if model.backbone.kind == "resnet":
    return (r"backbone/(?!layer4_).*",)
  last = model.backbone.depth - 1
  return (rf"backbone/(?!encoder_layer_{last}/|encoder_norm/).*",)


def classification_summary(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Mean cross-entropy, accuracy of the argmax, and (two classes) AUC of the class-1
  probability with F1, sensitivity, specificity and balanced accuracy at 0.5.

  Args:
    probs: ``[N, K]`` class probabilities; labels: ``[N]`` integer classes.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels).astype(np.int64).reshape(-1)
  picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
  out = {
    "loss": float(-np.mean(np.log(picked))),
    "accuracy": float(np.mean(np.argmax(probs, -1) == labels)),
  }
  if probs.shape[1] == 2:
    binary = classification_metrics(probs[:, 1], labels, threshold=0.5)
    out.update(
      {k: binary[k] for k in ("auc", "f1", "sensitivity", "specificity", "balanced_accuracy")}
    )
  return out


def synthetic_spec(fields: ml_collections.ConfigDict) -> brain_sequences.SyntheticBrainSpec:
  """The synthetic cohort ``data.synthetic`` describes (``root`` is where, not what)."""
  values = {k: v for k, v in fields.to_dict().items() if k != "root"}
  if "image_size" in values:
    values["image_size"] = tuple(values["image_size"])
  return brain_sequences.SyntheticBrainSpec(**values)


class _Select(grain.transforms.Map):
  """Keeps the model's inputs, the label and the ``optional`` fields a record has (drops
  strings and fields the model ignores)."""

  def __init__(self, inputs: tuple[str, ...], optional: tuple[str, ...] = ()):
    self.keys = tuple(inputs) + ("label",)
    self.optional = tuple(k for k in optional if k not in self.keys)

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in self.keys if k not in example]
    if missing:
      raise KeyError(f"sequence records lack {missing}; they have {sorted(example)}")
    kept = self.keys + tuple(k for k in self.optional if k in example)
    return {k: example[k] for k in kept}


class _CurrentImage(grain.transforms.Map):
  """``images [1, H, W, 1]`` of a length-1 sequence -> ``[H, W, 1]`` (and ``region_masks``,
  ``time_offsets`` likewise, when present)."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    per_image = ("images", "region_masks", "time_offsets")
    return {**example, **{k: example[k][-1] for k in per_image if k in example}}
