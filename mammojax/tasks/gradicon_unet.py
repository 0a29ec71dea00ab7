"""GradICON-style 2D U-Net registration as a trainer task, for synthetic or your own images.

The network is ICON's ``tallUNet2`` (:class:`~mammojax.models.registration.icon_unet.ICONUNet2`,
so GradICON / uniGradICON-shaped weights can initialise it through ``python -m mammojax.convert icon``)
wrapped as a transform, optionally followed by further U-Net steps
(``TwoStepRegistration``). The loss is GradICON's: ``LNCC(A ∘ phi_AB, B) + LNCC(B ∘ phi_BA, A)
+ lmbda * |grad(phi_AB ∘ phi_BA - id)|^2`` (``mammojax.losses.registration.gradicon_loss``).

Data (``config.data``): by default the synthetic longitudinal mammogram pairs (prior = moving,
current = fixed; their true field is known, so evaluation reports the endpoint error); with
``data.image_dir`` set, pairs of PNG / DICOM files from that directory, listed in
``data.pairs_csv`` (columns ``moving,fixed``, paths relative to the directory, optional
``split`` column) or else drawn at random among the directory's images.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.data.constants import IMAGE_SUFFIXES, SPLITS
from mammojax.data.pipelines.longitudinal import longitudinal_dataset, resolve_longitudinal_dir
from mammojax.losses.registration import gradicon_loss
from mammojax.losses.similarity import lncc_loss
from mammojax.models.registration import icon
from mammojax.models.registration.icon_unet import ICONUNet2
from mammojax.nn.warp import count_folds, warp
from mammojax.train.task import RegistrationTask


class LongitudinalToPair(grain.transforms.Map):
  """Synthetic longitudinal example -> ``{'moving': prior, 'fixed': current, 'displacement'}``."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    out = {"moving": example["previous_image"], "fixed": example["current_image"]}
    if "displacement" in example:
      out["displacement"] = example["displacement"]
    return out


class ImageFilePairs:
  """Random-access pairs of image files (a Grain source): ``{'moving', 'fixed'}`` ``[H, W, 1]``,
  each resized to ``image_size`` and min-max scaled to [0, 1]."""

  def __init__(self, pairs: list[tuple[str, str]], image_size: tuple[int, int]):
    self._pairs = pairs
    self._size = tuple(image_size)

  def __len__(self) -> int:
    return len(self._pairs)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    moving, fixed = self._pairs[index]
    return {"moving": self._load(moving), "fixed": self._load(fixed)}

  def _load(self, path: str) -> np.ndarray:
    from mammojax.data.ingest.readers import read_image  # pylint: disable=import-outside-toplevel

    pixels = read_image(path).pixels
    resized = np.asarray(jax.image.resize(pixels, self._size, "linear"))
    low, high = float(resized.min()), float(resized.max())
    return ((resized - low) / (high - low if high > low else 1.0))[..., None].astype(np.float32)


def file_pairs(
  image_dir: str,
  split: str,
  *,
  pairs_csv: str = "",
  num_pairs: int = 256,
  fractions: tuple[float, float] = (0.8, 0.1),
  seed: int = 0,
) -> list[tuple[str, str]]:
  """``(moving, fixed)`` paths of ``split``: from ``pairs_csv`` or random within the split's
  share of the directory's images (sorted names cut by ``fractions`` of train and val)."""
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"data.image_dir={image_dir!r} is not a directory")
  if pairs_csv:
    path = pairs_csv if os.path.isabs(pairs_csv) else os.path.join(image_dir, pairs_csv)
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
    if rows and not {"moving", "fixed"} <= set(rows[0]):
      raise ValueError(
        f"{path} needs columns 'moving' and 'fixed' (and optionally 'split'), got {sorted(rows[0])}"
      )
    pairs = [
      (os.path.join(image_dir, r["moving"]), os.path.join(image_dir, r["fixed"]))
      for r in rows
      if r.get("split", "train") == split or "split" not in r
    ]
    if not pairs:
      raise ValueError(f"{path} has no pairs for split {split!r}")
    return pairs
  files = sorted(
    os.path.join(image_dir, name)
    for name in os.listdir(image_dir)
    if name.lower().endswith(IMAGE_SUFFIXES)
  )
  cut_train = int(round(fractions[0] * len(files)))
  cut_val = cut_train + int(round(fractions[1] * len(files)))
  chosen = {"train": files[:cut_train], "val": files[cut_train:cut_val], "test": files[cut_val:]}[
    split
  ]
  if len(chosen) < 2:
    raise ValueError(
      f"split {split!r} of {image_dir} has {len(chosen)} images ({len(files)} "
      f"PNG/DICOM files in all); it needs >= 2 to make pairs"
    )
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  first = rng.integers(0, len(chosen), num_pairs)
  second = (first + rng.integers(1, len(chosen), num_pairs)) % len(chosen)
  return [(chosen[i], chosen[j]) for i, j in zip(first, second)]


class GradICONUNetTask(RegistrationTask):
  """``config.task='mammojax.tasks.gradicon_unet:GradICONUNetTask'``; batches hold ``moving``
  and ``fixed`` ``[B, H, W, 1]`` (and ``displacement`` ``[B, H, W, 2]`` when known)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model = self._build(train=True)
    self._eval_model = self._build(train=False)
    self._data_dir = None

  def _build(self, train: bool) -> icon.RegistrationModule:
    m = self.config.model
    steps = [
      icon.FunctionFromVectorField(
        ICONUNet2(tuple(m.down_features), tuple(m.up_features), train=train)
      )
      for _ in range(m.num_steps)
    ]
    network = steps[0]
    for step in steps[1:]:
      network = icon.TwoStepRegistration(network, step)
    return network

  def input_shape(self) -> tuple[int, int]:
    return tuple(self.config.data.image_size)

  def dataset(self, split: str) -> grain.MapDataset:
    data = self.config.data
    if data.image_dir:
      pairs = file_pairs(
        data.image_dir,
        split,
        pairs_csv=data.pairs_csv,
        num_pairs=data.num_pairs if split == "train" else data.num_eval_pairs,
        seed=self.config.seed,
      )
      return grain.MapDataset.source(ImageFilePairs(pairs, tuple(data.image_size)))
    if self._data_dir is None:
      self._data_dir = resolve_longitudinal_dir(data)
    return longitudinal_dataset(self._data_dir, split).map(LongitudinalToPair())

  def init_variables(self, rng, batch):
    return self._eval_model.init(rng, batch["moving"], batch["fixed"])

  def loss(self, params, model_state, batch, rng, train):
    moving, fixed = batch["moving"], batch["fixed"]
    both_moving = jnp.concatenate([moving, fixed])
    both_fixed = jnp.concatenate([fixed, moving])
    variables = {"params": params, **model_state}
    if train:
      fields, updates = self.model.apply(
        variables, both_moving, both_fixed, mutable=["batch_stats"]
      )
      model_state = {**model_state, **updates}
    else:
      fields = self._eval_model.apply(variables, both_moving, both_fixed)
    field_ab, field_ba = jnp.split(fields, 2)
    sigma = self.config.model.lncc_sigma
    parts = gradicon_loss(
      moving,
      fixed,
      field_ab,
      field_ba,
      rng,
      lmbda=self.config.model.lmbda,
      similarity=lambda a, b: lncc_loss(a, b, sigma=sigma),
    )
    metrics = {k: v for k, v in parts.items() if k != "loss"}
    return parts["loss"], (metrics, model_state)

  def displacement(self, variables, *, moving, fixed) -> jax.Array:
    """The trained field ``[B, H, W, 2]`` (pixels, 'ij'); ``mammojax.register --model`` uses it."""
    return self._eval_model.apply(variables, moving, fixed)

  def predict(self, variables, batch):
    moving, fixed = batch["moving"], batch["fixed"]
    field = self.displacement(variables, moving=moving, fixed=fixed)
    warped = warp(moving, field, padding="border")
    sigma = self.config.model.lncc_sigma
    per_example = jax.vmap(lambda a, b: lncc_loss(a[None], b[None], sigma=sigma))
    out = {
      "lncc": per_example(warped, fixed),
      "lncc_identity": per_example(moving, fixed),
      "folds": count_folds(field).astype(jnp.float32),
    }
    if "displacement" in batch:
      error = jnp.linalg.norm(field - batch["displacement"], axis=-1)
      out["epe"] = jnp.mean(error, axis=(1, 2))
      out["epe_identity"] = jnp.mean(jnp.linalg.norm(batch["displacement"], axis=-1), axis=(1, 2))
    return out

  def evaluate(self, predictions):
    return {k: float(np.mean(v)) for k, v in predictions.items()}
