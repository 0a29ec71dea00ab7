"""The work behind ``python -m mammojax.explain``: what is explained (:class:`Subject`), and the
loop that maps, scores and writes every example (:func:`explain`).

A subject is a trained model with examples of a split (:func:`subject_of_run`): a
Temporal-GradCam :class:`~mammojax.models.sequence_classifier.ImageClassifier` maps single
images, a :class:`~mammojax.models.sequence_classifier.SequenceClassifier` every visit of each
sequence for the sequence's prediction, an ImgFeatAlign the current and the prior image for a
year's risk (:class:`~mammojax.interpret.risk.PairRunner`), an online FPN-MIL its images beside
its attention heatmaps (:class:`~mammojax.interpret.mil.MILRunner`); or a converted torchvision
/ timm backbone with image files (:func:`subject_of_backbone`, :func:`read_model_input`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mammojax.interpret import report
from mammojax.interpret.adapter import ModelAdapter, classifier_adapter, resnet_adapter, vit_adapter
from mammojax.interpret.methods import MethodSettings, attribution_maps, default_layer
from mammojax.interpret.mil import MILRunner
from mammojax.interpret.risk import IMAGES as PAIR_IMAGES
from mammojax.interpret.risk import PairRunner
from mammojax.interpret.sanity import cascading_layers, model_randomization_check
from mammojax.interpret.temporal import (
  sequence_parts,
  visit_image_adapter,
  visit_integrated_gradients,
)
from mammojax.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from mammojax.models.imgfeatalign import ImgFeatAlign
from mammojax.models.mil.fpn_mil import FPNMIL
from mammojax.models.sequence_classifier import ImageClassifier, SequenceClassifier
from mammojax.nn.resnet import ResNet
from mammojax.nn.vit import VisionTransformer


@dataclasses.dataclass
class Example:
  """One thing to explain.

  Attributes:
    name: the output folder's name (a position, never an identifier).
    images: the model input, ``[H, W, C]``, or ``[L, H, W, C]`` for a sequence.
    label: the true class, when known.
    region: ``[H, W]`` / ``[L, H, W]`` 1 = the region that carries the label, when known.
    mask: a sequence's ``[L]`` (1 = a real visit).
    time_offsets: a sequence's ``[L]`` years before the current visit.
    context: the model's other inputs (an image pair's ``time_gap``, a MIL bag's patches).
    info: JSON-ready facts copied into the example's row of ``attributions.json``.
  """

  name: str
  images: np.ndarray
  label: int | None = None
  region: np.ndarray | None = None
  mask: np.ndarray | None = None
  time_offsets: np.ndarray | None = None
  context: dict[str, Any] | None = None
  info: dict[str, Any] | None = None


@dataclasses.dataclass
class Subject:
  """A model and its examples.

  Attributes:
    description: what the model is (JSON-ready), for ``attributions.json``.
    examples: what to explain.
    adapter: the image model (None for sequences, whose adapter is made per example).
    sequence_model: the sequence classifier with its ``variables``, or None.
    runner: explains one example at a time, its own way (:class:`PairRunner`,
      :class:`MILRunner`), or None.
  """

  description: dict[str, Any]
  examples: list[Example]
  adapter: ModelAdapter | None = None
  sequence_model: SequenceClassifier | None = None
  variables: Mapping[str, Any] | None = None
  runner: PairRunner | MILRunner | None = None

  @property
  def sequences(self) -> bool:
    return self.sequence_model is not None


# ----------------------------------------------------------------------------- subjects


def subject_of_run(
  model: Any,
  variables: Mapping[str, Any],
  examples: Any,
  split: str,
  count: int,
  options: Mapping[str, Any] | None = None,
) -> Subject:
  """The first ``count`` examples of a task's ``explain_dataset(split)`` for its ``model``;
  ``options`` are the task's ``explain_options()`` (e.g. FPN-MIL's heatmap smoothing)."""
  available = len(examples)
  if available == 0:
    raise ValueError(f"--split={split} has no examples")
  picked = [examples[i] for i in range(min(count, available))]
  names = [f"{split}_{i:04d}" for i in range(len(picked))]
  if isinstance(model, ImgFeatAlign):
    return Subject(
      {
        "model": "ImgFeatAlign",
        "split": split,
        "years": model.num_years,
        "images": list(PAIR_IMAGES),
      },
      [_pair_example(name, e) for name, e in zip(names, picked)],
      runner=PairRunner(model, variables),
    )
  if isinstance(model, FPNMIL):
    return Subject(
      {"model": "FPNMIL", "split": split, "scales": list(model.head.scales)},
      [_mil_example(name, e) for name, e in zip(names, picked)],
      runner=MILRunner(model, variables, **(options or {})),
    )
  description = {"model": type(model).__name__, "backbone": dict(model.backbone), "split": split}
  if isinstance(model, ImageClassifier):
    return Subject(
      description,
      [_example(f"{split}_{i:04d}", e) for i, e in enumerate(picked)],
      adapter=classifier_adapter(model, variables),
    )
  if isinstance(model, SequenceClassifier):
    return Subject(
      {**description, "temporal": dict(model.temporal)},
      [_example(f"{split}_{i:04d}", e, sequence=True) for i, e in enumerate(picked)],
      sequence_model=model,
      variables=variables,
    )
  raise ValueError(f"{type(model).__name__} has no attribution adapter")


def _example(name: str, record: Mapping[str, Any], sequence: bool = False) -> Example:
  region = record.get("region_masks")
  return Example(
    name=name,
    images=np.asarray(record["images"], np.float32),
    label=int(record["label"]) if "label" in record else None,
    region=None if region is None else np.asarray(region),
    mask=np.asarray(record["sequence_mask"]) if sequence else None,
    time_offsets=np.asarray(record["time_offsets"]) if sequence else None,
  )


def _pair_example(name: str, record: Mapping[str, Any]) -> Example:
  """An ImgFeatAlign record as an image pair ``[2, H, W, 1]``, prior first."""
  region = record.get("region_masks")
  gap = float(record["time_gap"])
  return Example(
    name=name,
    images=np.stack([record["previous_image"], record["current_image"]]).astype(np.float32),
    region=None if region is None else np.asarray(region),
    context={"time_gap": gap},
    info={
      "time_gap": gap,
      "has_prior": int(record["has_prior"]),
      "years_to_cancer": float(record["years_to_cancer"]),
    },
  )


def _mil_example(name: str, record: Mapping[str, Any]) -> Example:
  """An FPN-MIL record (``explain_dataset``'s, with the whole ``image``) and its bag."""
  region = record.get("region_masks")
  return Example(
    name=name,
    images=np.asarray(record["image"], np.float32),
    label=int(record["label"] > 0.5),
    region=None if region is None else np.asarray(region),
    context={k: np.asarray(record[k]) for k in ("patches", "patch_coords", "patch_mask")},
  )


def subject_of_backbone(
  kind: str, fields: Mapping[str, Any], variables: Mapping[str, Any], images: list[np.ndarray]
) -> Subject:
  """A converted ``resnet`` / ``vit`` classifier (``source.json``'s ``model_fields``) and input
  images ``[H, W, 3]``."""
  if not fields.get("num_classes"):
    raise ValueError(
      f"the converted {kind} has no classifier head (fc / heads.head): explain needs class "
      "logits; convert the full model's state dict"
    )
  if kind == "resnet":
    adapter = resnet_adapter(ResNet(**fields), variables)
  else:
    model = VisionTransformer(**fields)
    for i, image in enumerate(images):
      if image.shape[:2] != (model.image_size, model.image_size):
        raise ValueError(
          f"--images[{i}] is {image.shape[0]}x{image.shape[1]}; this ViT takes "
          f"{model.image_size}x{model.image_size} images: resize it first"
        )
    adapter = vit_adapter(model, variables)
  examples = [Example(f"image_{i:03d}", image) for i, image in enumerate(images)]
  return Subject({"model": kind, "fields": dict(fields)}, examples, adapter=adapter)


def read_model_input(path: str, flag: str) -> np.ndarray:
  """A model input ``[H, W, 3]`` float32 from a file (see ``python -m mammojax.explain``)."""
  from mammojax.data.ingest import readers  # pylint: disable=import-outside-toplevel

  if path.lower().endswith(".npy"):
    try:
      image = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{flag} {path}: not a readable .npy array ({e})") from None
    if image.ndim != 3 or image.shape[-1] != 3 or not np.issubdtype(image.dtype, np.floating):
      raise ValueError(
        f"{flag} {path}: a .npy input must be a float [H, W, 3] array, got {image.dtype} "
        f"{image.shape}"
      )
  else:
    try:
      pixels = readers.read_image(path).pixels
    except readers.ImageReadError as e:
      raise ValueError(f"{flag}: {e}") from None
    scale = np.iinfo(pixels.dtype).max if np.issubdtype(pixels.dtype, np.integer) else 1.0
    grey = np.asarray(pixels, np.float32) / scale
    image = (np.repeat(grey[..., None], 3, axis=-1) - IMAGENET_MEAN) / IMAGENET_STD
  if not np.isfinite(image).all():
    raise ValueError(f"{flag} {path}: the image has NaN or infinite values")
  return np.asarray(image, np.float32)


# ----------------------------------------------------------------------------- the loop


def explain(
  subject: Subject,
  out_dir: str,
  *,
  methods: Sequence[str],
  layer: str = "",
  target: int | None = None,
  batch_size: int = 8,
  sanity_check: bool = False,
  progress: bool = True,
  seed: int = 0,
  **method_options: Any,
) -> dict[str, Any]:
  """Maps, scores and writes every example of ``subject`` under ``out_dir``; returns the
  summary ``attributions.json`` holds. ``method_options`` are :class:`MethodSettings` fields."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  runner = subject.runner
  if runner is not None:
    if sanity_check:
      raise ValueError(
        f"--sanity_check: the randomisation check runs on image classifiers, sequence models "
        f"and converted backbones, not on {subject.description['model']} runs"
      )
    settings = MethodSettings(
      layer=runner.layer(layer, subject.examples[0]), seed=seed, **method_options
    )
    rectified = runner.rectified
  else:
    first_adapter, first_rows = _first_adapter(subject)
    first_rows = jnp.asarray(first_rows)
    settings = MethodSettings(
      layer=layer or default_layer(first_adapter, first_rows), seed=seed, **method_options
    )
    rectified = first_adapter.rectifiable
  collected: dict[str, dict[str, list[np.ndarray]]] = {}
  rows = []
  bar = tqdm(total=len(subject.examples), disable=not progress, unit="example", file=sys.stderr)
  if runner is not None:
    explain_group = _explain_with_runner
  else:
    explain_group = _explain_sequence if subject.sequences else _explain_images
  for group in _groups(subject, batch_size):
    for row, scores in explain_group(subject, group, out_dir, methods, settings, target):
      rows.append(row)
      for name, values in scores.items():
        for score, array in values.items():
          collected.setdefault(name, {}).setdefault(score, []).append(array)
      bar.update(1)
  bar.close()
  summary = {
    "model": subject.description,
    "methods": list(methods),
    "settings": dataclasses.asdict(settings),
    "guided_rectified": rectified,
    "examples": rows,
    "scores": report.summarize_scores(collected) if collected else None,
  }
  if runner is not None:
    summary["notes"] = list(runner.notes)
  if sanity_check:
    summary["sanity_check"] = _sanity(first_adapter, first_rows, methods, settings, seed)
  return summary


def _first_adapter(subject: Subject) -> tuple[ModelAdapter, np.ndarray]:
  """The adapter and input rows of the first example (for the layer and the sanity check)."""
  first = subject.examples[0]
  if not subject.sequences:
    return subject.adapter, first.images[None]
  adapter = visit_image_adapter(
    subject.sequence_model, subject.variables, first.mask, first.time_offsets
  )
  return adapter, first.images


def _groups(subject: Subject, batch_size: int) -> list[list[Example]]:
  """Consecutive examples of one image shape, at most ``batch_size`` each (one per sequence, and
  one per example of a runner)."""
  if subject.sequences or subject.runner is not None:
    return [[example] for example in subject.examples]
  groups: list[list[Example]] = []
  for example in subject.examples:
    last = groups[-1] if groups else None
    if last and len(last) < batch_size and last[0].images.shape == example.images.shape:
      last.append(example)
    else:
      groups.append([example])
  return groups


def _targets(logits: np.ndarray, target: int | None) -> np.ndarray:
  if target is None:
    return np.argmax(logits, axis=-1).astype(np.int32)
  if not 0 <= target < logits.shape[-1]:
    raise ValueError(f"--target={target}: the model has classes 0..{logits.shape[-1] - 1}")
  return np.full(logits.shape[:-1], target, np.int32)


def _probabilities(logits: np.ndarray, chosen: np.ndarray) -> np.ndarray:
  probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  return np.take_along_axis(probabilities, chosen[..., None], axis=-1)[..., 0]


def _explain_with_runner(subject, group, out_dir, methods, settings, target):
  (example,) = group
  directory = os.path.join(out_dir, example.name)
  yield subject.runner.explain(example, directory, methods, settings, target)


def _explain_images(subject, group, out_dir, methods, settings, target):
  images = jnp.asarray(np.stack([e.images for e in group]))
  logits = np.asarray(subject.adapter.forward(images))
  chosen = _targets(logits, target)
  probabilities = _probabilities(logits, chosen)
  maps = attribution_maps(subject.adapter, images, jnp.asarray(chosen), methods, settings)
  regions = [e.region for e in group]
  scores = report.score_maps(maps, np.stack(regions)) if all(r is not None for r in regions) else {}
  for i, example in enumerate(group):
    own = {name: values[i] for name, values in maps.items()}
    title = f"{example.name}: class {chosen[i]} (p={probabilities[i]:.2f})"
    report.write_image_example(os.path.join(out_dir, example.name), example.images, own, title)
    row = _row(example, int(chosen[i]), float(probabilities[i]))
    yield row, {n: {s: v[i : i + 1] for s, v in values.items()} for n, values in scores.items()}


def _explain_sequence(subject, group, out_dir, methods, settings, target):
  (example,) = group
  model, variables = subject.sequence_model, subject.variables
  mask, offsets = example.mask[None], example.time_offsets[None]
  images = jnp.asarray(example.images)
  logits = np.asarray(model.apply(variables, images[None], mask, offsets))
  chosen = _targets(logits, target)
  adapter = visit_image_adapter(model, variables, example.mask, example.time_offsets)
  real = example.mask > 0
  visit_target = jnp.full((images.shape[0],), int(chosen[0]), jnp.int32)
  maps = attribution_maps(adapter, images, visit_target, methods, settings)
  maps = {name: values[real] for name, values in maps.items()}
  features, apply_fn = sequence_parts(model, variables)
  visits = visit_integrated_gradients(
    apply_fn, features(images[None], mask), mask, offsets, int(chosen[0]), n_steps=settings.n_steps
  )
  per_visit = np.asarray(visits.per_visit[0])[real]
  probability = float(_probabilities(logits, chosen)[0])
  report.write_sequence_example(
    os.path.join(out_dir, example.name),
    example.images[real],
    maps,
    report.visit_labels(example.time_offsets[real]),
    per_visit,
    f"{example.name}: class {chosen[0]} (p={probability:.2f})",
  )
  row = _row(example, int(chosen[0]), probability)
  row.update(
    visit_time_offsets=[float(t) for t in example.time_offsets[real]],
    visit_integrated_gradients=[float(v) for v in per_visit],
    visit_integrated_gradients_delta=float(visits.delta[0]),
  )
  scores = report.score_maps(maps, example.region[real]) if example.region is not None else {}
  yield row, scores


def _row(example: Example, target: int, probability: float) -> dict[str, Any]:
  row = {"name": example.name, "target": target, "probability": probability}
  if example.label is not None:
    row["label"] = example.label
  return row


def _sanity(adapter, images, methods, settings, seed) -> dict[str, Any]:
  """Each method's maps on the first input against the same model with its weights re-drawn,
  stage by stage from the output (a ResNet's ``layer4_1``, ``layer4_0`` are one stage
  ``layer4``)."""
  top_level = list(adapter.variables["params"])
  # One top-level tree (a sequence model under 'classifier') is one stage: no order to trace.
  names = cascading_layers(adapter, images) if len(top_level) > 1 else top_level
  stages = list(dict.fromkeys(re.sub(r"^(layer\d+)_\d+$", r"\1", n) for n in names))
  target = jnp.asarray(_targets(np.asarray(adapter.forward(images)), None))
  out = {"stages": stages}
  for name in methods:

    def maps(variables, name=name):
      return attribution_maps(
        adapter.replace(variables=variables), images, target, [name], settings
      )[name]

    out[name] = model_randomization_check(
      maps, adapter.variables, jax.random.key(seed), layers=stages
    )["steps"]
  return out
