"""The seed's ICON digits demo as a trainer task.

A two-hidden-layer MLP (:class:`~mammojax.models.registration.icon.DigitsMLP`) becomes a
transform and is applied ``num_steps`` times with shared weights, each step registering the
moving digit warped by all earlier ones; the loss is ICON's ``DiffusionRegularizedNet`` with SSD
(``2 * SSD + lmbda * diffusion``). Training pairs are one digit class, evaluation pairs another.

Evaluation reports, per pair averaged over the split, ``similarity`` (the SSD between the warped
moving and the fixed digit), ``similarity_identity`` (the same SSD with no transform), their
ratio, the displacement's magnitude and the fold count; ``write_report`` (``python -m
mammojax.evaluate``) adds ``registration.png`` (moving, fixed, warped, deformed grid).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.atomic_files import write_json_atomic
from mammojax.data.digits import DigitPairsSpec, digit_pairs
from mammojax.losses.registration import regularized_loss
from mammojax.losses.similarity import ssd_loss
from mammojax.models.registration.icon import digits_registration
from mammojax.nn.warp import count_folds, warp
from mammojax.train.task import RegistrationTask

FIGURE_NAME = "registration.png"


class IconDigitsTask(RegistrationTask):
  """``config.task='mammojax.tasks.icon_digits:IconDigitsTask'``; batches hold ``moving`` and
  ``fixed`` digits ``[B, H, W, 1]``."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = config.model
    size = config.data.size
    self.model = digits_registration((size, size), hidden=m.hidden, num_steps=m.num_steps)
    self._spec = DigitPairsSpec(
      source=config.data.source,
      size=size,
      train_digit=config.data.train_digit,
      eval_digit=config.data.eval_digit,
      num_train=config.data.num_train,
      num_val=config.data.num_val,
      num_test=config.data.num_test,
      tfds_data_dir=config.data.tfds_data_dir,
      seed=config.data.seed,
    )

  def dataset(self, split: str) -> grain.MapDataset:
    return digit_pairs(self._spec, split)

  def init_variables(self, rng, batch):
    return self.model.init(rng, batch["moving"], batch["fixed"])

  def loss(self, params, model_state, batch, rng, train):
    del rng, train  # deterministic network
    moving, fixed = batch["moving"], batch["fixed"]
    displacement = self.model.apply({"params": params, **model_state}, moving, fixed)
    # Padding rows (``_valid == 0``) register a blank pair: zero similarity and no gradient
    # from the images; their (zero-gradient) field still enters the regulariser, which only
    # pulls it towards identity.
    valid = batch["_valid"].astype(moving.dtype)[:, None, None, None]
    parts = regularized_loss(
      moving * valid,
      fixed * valid,
      displacement,
      lmbda=self.config.model.lmbda,
      similarity=ssd_loss,
      regularizer="diffusion",
    )
    metrics = {k: v for k, v in parts.items() if k != "loss"}
    return parts["loss"], (metrics, model_state)

  def input_shape(self) -> tuple[int, int]:
    return (self.config.data.size, self.config.data.size)

  def displacement(self, variables, *, moving, fixed) -> jax.Array:
    """The network's field ``[B, H, W, 2]`` (pixels, 'ij'); ``mammojax.register --model``."""
    return self.model.apply(variables, moving, fixed)

  def predict(self, variables, batch):
    moving, fixed = batch["moving"], batch["fixed"]
    displacement = self.displacement(variables, moving=moving, fixed=fixed)
    warped = warp(moving, displacement, padding="border")
    per_example = lambda a, b: jnp.mean(jnp.square(a - b), axis=(1, 2, 3))  # noqa: E731
    return {
      "similarity": per_example(warped, fixed),
      "similarity_identity": per_example(moving, fixed),
      "displacement_rms": jnp.sqrt(jnp.mean(jnp.square(displacement), axis=(1, 2, 3))),
      "folds": count_folds(displacement).astype(jnp.float32),
      "warped": warped,
      "displacement": displacement,
    }

  def eval_passthrough_keys(self):
    return ("moving", "fixed")

  def evaluate(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    similarity = float(np.mean(predictions["similarity"]))
    identity = float(np.mean(predictions["similarity_identity"]))
    return {
      "similarity": similarity,
      "similarity_identity": identity,
      "similarity_ratio": similarity / max(identity, 1e-12),
      "displacement_rms": float(np.mean(predictions["displacement_rms"])),
      "folds": float(np.mean(predictions["folds"])),
    }

  def write_report(
    self, predictions: dict[str, np.ndarray], out_dir: str, examples=None
  ) -> dict[str, Any]:
    """``report.json`` (the eval metrics) and ``registration.png`` (the first pairs)."""
    from mammojax.viz.registration import save_registration_figure

    report = self.evaluate(predictions)
    os.makedirs(out_dir, exist_ok=True)
    count = min(int(self.config.eval.get("figure_examples", 6)), len(predictions["moving"]))
    save_registration_figure(
      os.path.join(out_dir, FIGURE_NAME),
      predictions["moving"][:count],
      predictions["fixed"][:count],
      predictions["warped"][:count],
      predictions["displacement"][:count],
      titles=[
        f"SSD {predictions['similarity_identity'][i]:.3f} -> {predictions['similarity'][i]:.3f}"
        for i in range(count)
      ],
    )
    report["figure"] = FIGURE_NAME
    write_json_atomic(os.path.join(out_dir, "report.json"), report, indent=2)
    return report
