"""AMAE pretraining as a trainer task: masked reconstruction of every acquired contrast.

``config.task='amae'``. The data are volume records (``python -m mammojax.ingest --task=volume``,
or the embedded synthetic brain volumes while ``data.dir`` is empty); masks are not used. The
contrasts ``data.contrasts`` are the vocabulary's slots, in order (a contrast the records lack is
an error naming it); a subject without any of them is an error naming the subject's hash.
Training sees random crops of ``data.crop_size`` inside the head, flips, in-plane quarter turns
and intensity jitter; evaluation takes each record's central crop with a fixed masking draw, so
the validation loss is comparable across steps.

The model is :class:`~mammojax.models.amae.mae.AdaptiveMAE` (``model.encoder``,
``model.decoder``, ``model.mask_ratio``, ``model.shared_mask``); the loss is the L2 on the masked
patches of acquired contrasts (``model.normalize_target``: SelfMedMAE's per-patch normalised
targets). ``python -m mammojax.evaluate`` writes the loss and the seed's Figure 2 (per contrast,
one slice of the original, the masked input and the reconstruction) for the first
``eval.report_figures`` subjects.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.atomic_files import write_json_atomic
from mammojax.data import records
from mammojax.data.pipelines import volume as volume_pipeline
from mammojax.data.synthetic import brain_volumes
from mammojax.losses.masked_reconstruction import masked_patch_loss
from mammojax.models.amae.encoder import ContrastEncoder
from mammojax.models.amae.mae import AdaptiveMAE, visible_count
from mammojax.models.amae.transfer import select_contrasts, unetr_vit_params
from mammojax.nn.dynamic_tokenizer import patch_grid, patchify, unpatchify
from mammojax.train.run_files import load_run_config
from mammojax.train.task import Task
from mammojax.viz.reconstruction import save_reconstruction_figure

ENCODER_FIELDS = (
  "patch_size",
  "hidden_dim",
  "depth",
  "num_heads",
  "mlp_dim",
  "position_embedding",
  "modality_embedding",
  "tokenizer_update",
  "qkv_bias",
)
# The fixed masking draw of evaluation.
_EVAL_MASKING_SEED = 0


def crop_sides(data: ml_collections.ConfigDict, patch_size: int) -> tuple[int, int, int]:
  """``data.crop_size`` as (D, H, W), or a ValueError naming the field and the fix."""
  crop = tuple(int(s) for s in data.crop_size)
  if len(crop) != 3 or min(crop) < 1:
    raise ValueError(f"data.crop_size={tuple(data.crop_size)} must be three sides (D, H, W)")
  patch_grid(crop, patch_size, "data.crop_size")
  return crop


def build_contrast_encoder(
  section: ml_collections.ConfigDict, num_slots: int, crop: Sequence[int], dtype: Any
) -> ContrastEncoder:
  """The :class:`ContrastEncoder` of a config's ``model.encoder`` section for ``num_slots``
  contrasts and crops of sides ``crop``."""
  return ContrastEncoder(
    num_slots=num_slots,
    image_size=tuple(int(s) for s in crop),
    **{field: section[field] for field in ENCODER_FIELDS},
    layer_norm_epsilon=section.get("layer_norm_epsilon", 1e-5),
    dropout_rate=section.get("dropout_rate", 0.0),
    remat=section.get("remat", False),
    dtype=jnp.dtype(dtype),
  )


class SelectSlots(grain.transforms.Map):
  """Keeps the contrasts ``names`` (record channels ``channels``) as slots, in order, checks that
  each subject has at least one of them and all of ``required`` (errors name the subject's
  hash), and removes the ``dropped`` ones (channel zeros, presence 0: an optional contrast
  withheld, e.g. to test a model without T2)."""

  def __init__(
    self,
    channels: tuple[int, ...],
    names: tuple[str, ...],
    required: tuple[str, ...] = (),
    dropped: tuple[str, ...] = (),
  ):
    self.channels, self.names = tuple(channels), tuple(names)
    self.required, self.dropped = tuple(required), tuple(dropped)

  def map(self, element):
    present = np.asarray(element["contrast_present"])[list(self.channels)].astype(np.int32)
    subject = element.get("subject_hash", "?")
    if not present.any():
      raise ValueError(
        f"subject {subject} has none of the contrasts {list(self.names)}; remove it from the "
        "records or add its contrasts to data.contrasts"
      )
    lacking = [n for n in self.required if not present[self.names.index(n)]]
    if lacking:
      raise ValueError(
        f"subject {subject} lacks the required contrast(s) {lacking}; re-ingest without it or "
        "remove it from data.required_contrasts"
      )
    volume = np.array(element["volume"][..., list(self.channels)])
    for name in self.dropped:
      slot = self.names.index(name)
      volume[..., slot], present[slot] = 0, 0
    out = dict(element)
    out["volume"], out["contrast_present"] = volume, present
    return out


def slot_channels(
  manifest_contrasts: Sequence[str], contrasts: Sequence[str], directory: str
) -> tuple[int, ...]:
  """Record channel of each contrast of ``contrasts``, or a ValueError naming the unknown ones."""
  names = list(manifest_contrasts)
  unknown = [c for c in contrasts if c not in names]
  if unknown or len(set(contrasts)) != len(contrasts) or not contrasts:
    raise ValueError(
      f"data.contrasts={list(contrasts)}: {unknown or 'names repeat or none given'}; the "
      f"records of {directory} hold the contrasts {names}"
    )
  return tuple(names.index(c) for c in contrasts)


class MaskedAutoencoderTask(Task):
  """``config.task='amae'`` (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m = config.model
    self.contrasts = tuple(config.data.contrasts)
    self.crop = crop_sides(config.data, int(m.encoder.patch_size))
    encoder = build_contrast_encoder(
      m.encoder, len(self.contrasts), self.crop, m.get("dtype", "float32")
    )
    visible_count(encoder.num_patches, m.mask_ratio)  # a ratio outside (0, 1) fails here
    d = m.decoder
    self.model = AdaptiveMAE(
      encoder=encoder,
      decoder_dim=d.dim,
      decoder_depth=d.depth,
      decoder_heads=d.heads,
      decoder_mlp_dim=d.mlp_dim,
      mask_ratio=m.mask_ratio,
      shared_mask=m.shared_mask,
    )

  @functools.cached_property
  def directory(self) -> str:
    return brain_volumes.dataset_dir(self.config.data)

  def dataset(self, split: str) -> grain.MapDataset:
    manifest = records.read_manifest(self.directory)["config"]
    channels = slot_channels(manifest.get("contrasts", ()), self.contrasts, self.directory)
    examples = volume_pipeline.volume_dataset(self.directory, split).map(
      SelectSlots(channels, self.contrasts)
    )
    if split != "train":
      examples = examples.map(volume_pipeline.CenterCrop(self.crop))
    return examples

  def augmentations(self):
    a = self.config.data.augment
    # Crops centred inside the head (no lesion label is used).
    return volume_pipeline.train_transforms(
      self.crop,
      pos=0.0,
      neg=1.0,
      flip_p=a.flip_p,
      rotate_p=a.rotate_p,
      scale=a.intensity_scale,
      shift=a.intensity_shift,
    )

  def init_variables(self, rng, batch):
    batch_size = batch["volume"].shape[0]
    volumes = jnp.zeros((batch_size, *self.crop, len(self.contrasts)), jnp.float32)
    present = jnp.ones((batch_size, len(self.contrasts)), jnp.int32)
    rngs = {"params": rng, "masking": rng, "dropout": rng}
    return self.model.init(rngs, volumes, present, train=False)

  def _reconstruct(self, variables, batch, rngs, train):
    out = self.model.apply(
      variables, batch["volume"], batch["contrast_present"], train=train, rngs=rngs
    )
    target = patchify(batch["volume"], self.model.encoder.patch_size)
    return out, target

  def loss(self, params, model_state, batch, rng, train):
    rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
    out, target = self._reconstruct({"params": params, **model_state}, batch, rngs, train)
    loss, count = masked_patch_loss(
      out["prediction"],
      target,
      out["mask"],
      batch["contrast_present"],
      batch["_valid"],
      normalize_target=self.config.model.normalize_target,
    )
    return loss, ({"loss": loss, "masked_patches": count}, model_state)

  def predict(self, variables, batch):
    rngs = {"masking": jax.random.key(_EVAL_MASKING_SEED, impl=self.config.rng_impl)}
    out, target = self._reconstruct(variables, batch, rngs, False)
    present = batch["contrast_present"]
    normalize = self.config.model.normalize_target

    def per_example(prediction):  # each example's loss and masked-patch count
      return jax.vmap(
        lambda p, t, m, a: masked_patch_loss(
          p[None], t[None], m[None], a[None], normalize_target=normalize
        )
      )(prediction, target, out["mask"], present)

    loss, count = per_example(out["prediction"])
    # The loss of predicting zeros (the mean of a normalised target): what 'loss' is read against.
    zeros_loss, _ = per_example(jnp.zeros_like(out["prediction"]))
    patches = out["prediction"]
    if normalize:  # back to intensities with the true patch's statistics
      mean = jnp.mean(target, axis=-1, keepdims=True)
      std = jnp.std(target, axis=-1, keepdims=True, ddof=1)
      patches = patches * (std + 1e-6) + mean
    encoder = self.model.encoder
    voxels = jnp.ones_like(target) * out["mask"][..., None]
    middle = self.crop[0] // 2
    figure = lambda x: unpatchify(x, encoder.grid, encoder.patch_size)[:, middle]  # noqa: E731
    return {
      "loss": loss,
      "loss_predicting_zeros": zeros_loss,
      "masked_patches": count,
      "slice_original": batch["volume"][:, middle].astype(jnp.float16),
      "slice_masked": figure(voxels).astype(jnp.uint8),
      "slice_reconstruction": figure(patches).astype(jnp.float16),
    }

  def eval_passthrough_keys(self):
    return ("contrast_present",)

  def evaluate(self, predictions):
    counts = np.asarray(predictions["masked_patches"], np.float64)
    losses = np.asarray(predictions["loss"], np.float64)
    total = float(counts.sum())
    zeros = np.asarray(predictions["loss_predicting_zeros"], np.float64)
    return {
      "loss": float(np.sum(losses * counts) / max(total, 1.0)),
      "loss_predicting_zeros": float(np.sum(zeros * counts) / max(total, 1.0)),
      "masked_patches": total,
      "num_examples": float(len(losses)),
    }

  def write_report(self, predictions, out_dir, examples=None):
    """``report.json`` (the masked-patch loss) and ``figures/subject_<i>.png``: the seed's
    Figure 2 for the first ``eval.report_figures`` subjects (middle axial slice of each crop)."""
    del examples
    os.makedirs(out_dir, exist_ok=True)
    report: dict[str, Any] = {"metrics": self.evaluate(predictions)}
    report["notes"] = (
      "loss: mean squared error over the voxels of the masked patches of acquired contrasts "
      + ("(per-patch normalised targets)" if self.config.model.normalize_target else "")
      + f"; a fixed masking draw (seed {_EVAL_MASKING_SEED}) on each record's central crop."
    )
    count = min(int(self.config.eval.get("report_figures", 4)), len(predictions["loss"]))
    paths = []
    for i in range(count):
      path = os.path.join(out_dir, "figures", f"subject_{i}.png")
      paths.append(
        save_reconstruction_figure(
          path,
          np.asarray(predictions["slice_original"][i], np.float32),
          np.asarray(predictions["slice_masked"][i]).astype(bool),
          np.asarray(predictions["slice_reconstruction"][i], np.float32),
          np.asarray(predictions["contrast_present"][i]),
          self.contrasts,
          title=f"subject {i}: mask ratio {self.config.model.mask_ratio}",
        )
      )
    report["figures"] = paths
    write_json_atomic(os.path.join(out_dir, "report.json"), report, indent=2)
    return report


def pretrained_encoder(
  config: ml_collections.ConfigDict, crop: Sequence[int], loaded: Any, source: str
) -> dict[str, Any]:
  """The part of a pretrained AMAE run's variables ``loaded`` (from the workdir ``source``) that
  the segmentation network of ``config`` takes (:mod:`mammojax.models.amae.transfer`), after
  checking that the architectures agree; errors name the field and the file."""
  pretrained = load_run_config(source)
  if pretrained.get("task") != "amae":
    raise ValueError(
      f"model.pretrained={source} is a {pretrained.get('task')!r} run; it must be an AMAE "
      "pretraining run (configs/amae.py)"
    )
  theirs = pretrained.model.encoder
  kind = config.model.kind
  if kind == "adaptive_unetr":
    ours = {field: config.model.encoder[field] for field in ENCODER_FIELDS}
  else:  # UNETR's ViT: the fields its layout fixes
    ours = dict(
      patch_size=16,
      hidden_dim=config.model.hidden_size,
      depth=12,
      num_heads=config.model.num_heads,
      mlp_dim=config.model.mlp_dim,
      qkv_bias=config.model.qkv_bias,
    )
  for field, value in ours.items():
    if theirs.get(field) != value:
      raise ValueError(
        f"model.pretrained={source}: its encoder has {field}={theirs.get(field)!r} (config.json "
        f"model.encoder.{field}), this model {value!r}; fine-tune a model of the same size"
      )
  encoder = loaded["params"]["encoder"]
  source_contrasts = tuple(pretrained.data.contrasts)
  contrasts = tuple(config.data.contrasts)
  if kind == "adaptive_unetr":
    return {"params": select_contrasts(encoder, source_contrasts, contrasts, source)}
  grid = tuple(int(s) // 16 for s in crop)
  vit = unetr_vit_params(
    encoder,
    source_contrasts,
    contrasts,
    update=theirs.tokenizer_update,
    position_embedding=theirs.position_embedding,
    grid=grid,
    source=source,
  )
  return {"params": vit}
