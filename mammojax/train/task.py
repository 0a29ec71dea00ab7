"""The small interface through which the generic trainer drives every task.

A task binds a Flax model to its loss, its evaluation metrics and its data. The trainer owns
everything else: batching, sharding, the optimizer, freezing, checkpoints, metric writing.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from flax import linen as nn

from mammojax.atomic_files import write_json_atomic

Batch = dict[str, Any]
Variables = dict[str, Any]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
  """Model + loss + metrics + data.

  Subclasses set ``self.model`` in ``__init__``. ``variables`` below means the Flax variable
  dict ``{'params': ..., 'batch_stats': ..., ...}``; ``model_state`` is that dict without
  ``'params'`` (the mutable collections, e.g. BatchNorm statistics).
  """

  model: nn.Module

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def init_variables(self, rng: jax.Array, batch: Batch) -> Variables:
    """Initial variables for one example batch (called under ``jax.eval_shape`` and ``jit``)."""

  @abc.abstractmethod
  def loss(
    self, params: Any, model_state: Variables, batch: Batch, rng: jax.Array, train: bool
  ) -> tuple[jax.Array, tuple[Metrics, Variables]]:
    """Scalar loss, its per-batch scalar metrics, and the updated ``model_state``.

    Must be a pure function of its arguments (it is differentiated and jitted). ``rng`` is
    already folded with the step. Examples with ``batch['_valid'] == 0`` are padding.
    """

  @abc.abstractmethod
  def predict(self, variables: Variables, batch: Batch) -> dict[str, jax.Array]:
    """Per-example evaluation outputs, each ``[B, ...]`` (gathered on the host by the trainer)."""

  @abc.abstractmethod
  def evaluate(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Aggregates the predictions of a whole evaluation split (padding already removed)."""

  @abc.abstractmethod
  def dataset(self, split: str) -> grain.MapDataset:
    """The unbatched, unshuffled examples of ``split`` (dicts of numpy arrays)."""

  def augmentations(self) -> Sequence[grain.transforms.Map | grain.transforms.RandomMap]:
    """Host-side transforms applied to training examples only, after the shuffle and repeat
    (so a random transform draws anew in every epoch)."""
    return ()

  def frozen_param_patterns(self) -> tuple[str, ...]:
    """Parameter-path regexes the model never trains (e.g. a frozen registration network);
    the trainer adds ``config.train.freeze`` to these."""
    return ()

  def pretrained_checkpoints(self) -> dict[str, str]:
    """``{variable path prefix: converted-checkpoint dir}`` of pieces loaded at init (e.g. a
    frozen registration network under ``'registration'``)."""
    return {}

  def select_pretrained(self, prefix: str, loaded: Variables, source: str) -> Variables:
    """The part of the variables ``loaded`` from ``source`` that goes under ``prefix`` (a key
    of :meth:`pretrained_checkpoints`); by default all of them. E.g. a classifier's backbone
    subtree, or a converted backbone without its ImageNet head."""
    del prefix, source
    return loaded

  def write_report(
    self,
    predictions: dict[str, np.ndarray],
    out_dir: str,
    examples: grain.MapDataset | None = None,
  ) -> dict[str, Any]:
    """A full evaluation report (JSON, plots) in ``out_dir``; by default the eval metrics.

    ``examples``: the split's examples in prediction order (``python -m mammojax.evaluate``
    passes them), for reports that draw the inputs beside the predictions.
    """
    del examples
    report = self.evaluate(predictions)
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "report.json"), report, indent=2)
    return report

  def eval_passthrough_keys(self) -> tuple[str, ...]:
    """Batch fields copied into the predictions for :meth:`evaluate` (labels, subgroups)."""
    return ()


class RegistrationTask(Task):
  """A task whose model registers an image pair: ``python -m mammojax.register --model`` runs any
  such task's trained network through these two methods."""

  @abc.abstractmethod
  def input_shape(self) -> tuple[int, ...]:
    """The spatial shape ``S`` (``(H, W)`` or ``(D, H, W)``) the network takes."""

  @abc.abstractmethod
  def displacement(self, variables: Variables, *, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    """The field ``[B, *S, n]`` (pixels, 'ij') with ``warped(x) = moving(x + u(x))`` for images
    ``moving`` and ``fixed`` ``[B, *S, C]``."""


class AttributionTask(Task):
  """A task whose model's predictions ``python -m mammojax.explain`` maps back to the pixels: it
  names the examples to explain (the model's inputs plus, where the data has them, the region
  that carries the label)."""

  @abc.abstractmethod
  def explain_dataset(self, split: str) -> grain.MapDataset:
    """The split's examples as :meth:`dataset` gives them plus what attribution needs besides
    the model's inputs (``time_offsets``, a MIL bag's whole image) and, where the records have
    them, ``region_masks``."""

  def explain_options(self) -> dict[str, Any]:
    """Settings of the explanation that the run's config holds (e.g. FPN-MIL's heatmap
    smoothing), passed to the explain command's model runner; none by default."""
    return {}
