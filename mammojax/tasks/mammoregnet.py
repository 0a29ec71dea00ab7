"""MammoRegNet as a trainer task: register the prior mammogram (moving) to the current one
(fixed) with the published loss; on synthetic pairs the true field is known, so evaluation
reports the endpoint error."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.data.pipelines.longitudinal import longitudinal_dataset, resolve_longitudinal_dir
from mammojax.losses.mammoregnet import mammoregnet_loss
from mammojax.losses.similarity import ncc_loss
from mammojax.models.registration.mammoregnet import MammoRegNet
from mammojax.nn.warp import count_folds
from mammojax.train.task import RegistrationTask


class MammoRegNetTask(RegistrationTask):
  """``config.task='mammoregnet'``; the fixed image is ``current_image``, the moving one
  ``previous_image``."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model = MammoRegNet(**config.model.registration.to_dict())
    self._data_dir = None

  def dataset(self, split: str) -> grain.MapDataset:
    if self._data_dir is None:
      self._data_dir = resolve_longitudinal_dir(self.config.data)
    return longitudinal_dataset(self._data_dir, split)

  def init_variables(self, rng, batch):
    return self.model.init(rng, moving=batch["previous_image"], fixed=batch["current_image"])

  def loss(self, params, model_state, batch, rng, train):
    del rng, train  # deterministic network
    out = self.model.apply(
      {"params": params, **model_state},
      moving=batch["previous_image"],
      fixed=batch["current_image"],
    )
    valid = batch["_valid"].astype(jnp.float32)[:, None, None, None]
    parts = mammoregnet_loss(
      batch["current_image"] * valid,
      out["warped"] * valid,
      out["affine_warped"] * valid,
      out["flow"],
      regularity_weight=self.config.model.regularity_weight,
      jacobian_weight=self.config.model.jacobian_weight,
    )
    metrics = {k: v for k, v in parts.items() if k != "loss"}
    return parts["loss"], (metrics, model_state)

  def input_shape(self) -> tuple[int, int]:
    return tuple(self.config.data.image_size)

  def displacement(self, variables, *, moving, fixed) -> jax.Array:
    """MammoRegNet's flow ``[B, H, W, 2]`` (pixels, 'ij'); ``mammojax.register --model``."""
    return self.model.apply(variables, moving=moving, fixed=fixed)["flow"]

  def predict(self, variables, batch):
    fixed, moving = batch["current_image"], batch["previous_image"]
    out = self.model.apply(variables, moving=moving, fixed=fixed)
    flow = out["flow"]
    ncc = jax.vmap(lambda a, b: 1.0 - ncc_loss(a[None], b[None]))
    result = {
      "ncc": ncc(fixed, out["warped"]),
      "ncc_identity": ncc(fixed, moving),
      "folds": count_folds(flow).reshape(fixed.shape[0], -1).sum(-1).astype(jnp.float32),
    }
    if "displacement" in batch:
      # Endpoint error inside the breast of the fixed image (background has no correspondence).
      breast = (fixed[..., 0] > fixed.min(axis=(1, 2, 3), keepdims=True)[..., 0]).astype(
        jnp.float32
      )
      area = jnp.maximum(breast.sum((1, 2)), 1.0)
      error = jnp.linalg.norm(flow - batch["displacement"], axis=-1)
      truth = jnp.linalg.norm(batch["displacement"], axis=-1)
      result["epe"] = (error * breast).sum((1, 2)) / area
      result["epe_identity"] = (truth * breast).sum((1, 2)) / area
    return result

  def evaluate(self, predictions):
    return {k: float(np.mean(v)) for k, v in predictions.items()}
