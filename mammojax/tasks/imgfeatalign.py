"""ImgFeatAlign as a trainer task: the model, its multi-head risk loss, risk metrics, data, and
the examples ``python -m mammojax.explain`` maps (with the lesion regions the records mark)."""

from __future__ import annotations

from typing import Any

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.data.pipelines.augment import AugmentConfig, train_augmentations
from mammojax.data.pipelines.longitudinal import longitudinal_dataset, resolve_longitudinal_dir
from mammojax.interpret.scoring import boxes_to_mask
from mammojax.losses.risk import risk_loss
from mammojax.metrics import risk as risk_metrics
from mammojax.metrics.risk_report import risk_report
from mammojax.models.imgfeatalign import ImgFeatAlign
from mammojax.models.registration.mammoregnet import MammoRegNet
from mammojax.train.task import AttributionTask


class ImgFeatAlignTask(AttributionTask):
  """Longitudinal risk from a current and a prior mammogram (``config.task='imgfeatalign'``)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = config.model
    registration = MammoRegNet(**m.registration.to_dict(), name="registration")
    self.model = ImgFeatAlign(
      registration=registration,
      num_years=config.data.num_years,
      num_heads=m.num_heads,
      dropout_rate=m.dropout_rate,
      max_time=m.max_time,
      time_steps=m.time_steps,
      time_dropout_rate=m.time_dropout_rate,
      encoder_width=m.encoder_width,
      finetune_all=m.finetune_all,
      align=m.align,
      use_prior=m.use_prior,
      use_time_encoding=m.use_time_encoding,
      bcrbench_flow_compat=m.bcrbench_flow_compat,
      warp_impl=m.warp_impl,
    )
    self.head_weights = dict(m.head_weights)
    self._data_dir = None

  def _directory(self) -> str:
    if self._data_dir is None:
      self._data_dir = resolve_longitudinal_dir(self.config.data)
    return self._data_dir

  def dataset(self, split: str) -> grain.MapDataset:
    return longitudinal_dataset(self._directory(), split)

  def explain_dataset(self, split: str) -> grain.MapDataset:
    """:meth:`dataset` plus, where the records carry lesion boxes (the synthetic data),
    ``region_masks`` ``[2, H, W]`` uint8: the lesion's box in the prior (first) and in the
    current image, the order of the explain command's maps."""
    return longitudinal_dataset(self._directory(), split, lesion_boxes=True).map(_LesionRegions())

  # -- model ------------------------------------------------------------------------------------

  def _apply(self, variables, batch, train: bool, rng=None, mutable=False):
    rngs = {"dropout": rng} if rng is not None else None
    return self.model.apply(
      variables,
      batch["current_image"],
      batch["previous_image"],
      batch["time_gap"],
      train=train,
      rngs=rngs,
      mutable=mutable,
    )

  def init_variables(self, rng, batch):
    return self.model.init(
      {"params": rng, "dropout": rng},
      batch["current_image"],
      batch["previous_image"],
      batch["time_gap"],
      train=False,
    )

  def augmentations(self):
    """Geometric and intensity jitter shared by current and prior (``config.data.augment``)."""
    a = self.config.data.augment
    if not a.enabled:
      return ()
    return train_augmentations(
      AugmentConfig(
        flip_p=a.flip_p,
        rotation_deg=a.rotation_deg,
        scale=a.scale,
        shift=a.shift,
        contrast=a.contrast,
        brightness=a.brightness,
      )
    )

  def frozen_param_patterns(self) -> tuple[str, ...]:
    """The registration network is always frozen; the encoder too unless ``finetune_all``."""
    m = self.config.model
    frozen = ("registration/.*",) if m.align and m.use_prior else ()
    return frozen + (() if m.finetune_all else ("encoder/.*",))

  def pretrained_checkpoints(self) -> dict[str, str]:
    m = self.config.model
    uses_registration = m.align and m.use_prior
    if m.registration_checkpoint and uses_registration:
      return {"registration": m.registration_checkpoint}
    return {}

  def loss(self, params, model_state, batch, rng, train):
    variables = {"params": params, **model_state}
    updates_bn = train and self.config.model.finetune_all
    if updates_bn:
      outputs, new_state = self._apply(variables, batch, True, rng, mutable=["batch_stats"])
    else:
      outputs, new_state = self._apply(variables, batch, train, rng), model_state
    heads = self.model.risk_heads(outputs, batch)
    total, per_head = risk_loss(heads, self.head_weights, valid=batch["_valid"])
    metrics = {f"loss_{name}": value for name, value in per_head.items()}
    return total, (metrics, new_state)

  def predict(self, variables, batch):
    outputs = self._apply(variables, batch, False)
    return {"risk": self.model.primary_risk(outputs).astype(jnp.float32)}

  def eval_passthrough_keys(self):
    return ("years_to_cancer", "years_to_followup", "density", "cancer_type")

  def evaluate(self, predictions):
    probs = predictions["risk"]
    ytc, ytf = predictions["years_to_cancer"], predictions["years_to_followup"]
    metrics = {"c_index": risk_metrics.c_index(probs, ytc, ytf)}
    for year, auc in risk_metrics.auc_per_year(probs, ytc, ytf).items():
      metrics[f"auc_year{year}"] = auc
    metrics["mean_risk"] = float(np.mean(probs[:, -1]))
    return metrics

  def write_report(self, predictions, out_dir, examples=None):
    """C-index and per-year AUC with bootstrap 95% CIs, per density / cancer-type subgroup,
    ROC and calibration plots (``report.json``, ``roc.png``, ``calibration.png``)."""
    from mammojax.viz.risk_plots import write_risk_report

    probs = predictions["risk"]
    ytc, ytf = predictions["years_to_cancer"], predictions["years_to_followup"]
    subgroups = {
      name: predictions[name]
      for name in ("density", "cancer_type")
      if name in predictions and np.any(predictions[name] > 0)
    }
    report = risk_report(
      probs,
      ytc,
      ytf,
      subgroups=subgroups,
      n_bootstrap=self.config.eval.get("bootstrap", 1000),
      seed=self.config.seed,
    )
    write_risk_report(out_dir, report, probs, ytc, ytf)
    return report


class _LesionRegions(grain.transforms.Map):
  """``prior_lesion_boxes`` and ``lesion_boxes`` ``[N, 4]`` -> ``region_masks`` ``[2, H, W]``
  uint8 (prior, current); records without them pass unchanged."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    if "lesion_boxes" not in example or "prior_lesion_boxes" not in example:
      return example
    shape = example["current_image"].shape[:2]
    masks = [boxes_to_mask(example[k], shape) for k in ("prior_lesion_boxes", "lesion_boxes")]
    return {**example, "region_masks": np.stack(masks).astype(np.uint8)}
