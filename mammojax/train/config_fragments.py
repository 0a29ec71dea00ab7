"""Config sections that several ``configs/*.py`` share, as functions over a ``base_config()``.

Each experiment config starts from :func:`mammojax.train.base_config.base_config` and calls
these for what it has in common with the others: the synthetic longitudinal data of the
registration and risk experiments, the MammoRegNet sizes that a registration run and the
ImgFeatAlign run loading it must agree on, the ``:smoke`` variants' tiny run, and the error for
an unknown variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from mammojax.data.synthetic import brain_volumes

# (H, W) of the synthetic longitudinal experiments (MammoRegNet needs multiples of 16); the
# ImgFeatAlign default loads a MammoRegNet trained at this size.
LONGITUDINAL_IMAGE_SIZE = (128, 96)
# (H, W) of the reference's longitudinal data (the ``:paper`` variants).
PAPER_IMAGE_SIZE = (512, 416)
# (H, W) of the ``:smoke`` variants of the registration and risk experiments.
SMOKE_IMAGE_SIZE = (32, 32)
# Training and evaluation batch of every ``:smoke`` variant: divisible by the 8 fake devices of
# the tests.
SMOKE_BATCH_SIZE = 8

_MAMMOREGNET_SIZES = {
  # The reference widths with one Swin block per stage instead of its four: CPU minutes.
  "default": {"enc_channels": 8, "dec_channels": 16, "num_layers": 1, "window_size": (5, 5)},
  # The reference's network: four Swin blocks per stage.
  "paper": {"enc_channels": 8, "dec_channels": 16, "num_layers": 4, "window_size": (5, 5)},
  "smoke": {"enc_channels": 4, "dec_channels": 8, "num_layers": 1, "window_size": (5, 5)},
}


def mammoregnet_network(size: str = "default") -> ml_collections.ConfigDict:
  """The MammoRegNet architecture of ``size`` (``'default'``, ``'paper'`` or ``'smoke'``).

  configs/mammoregnet.py trains it as ``model.registration``; configs/imgfeatalign.py must load
  one of the same size, so both take it from here.
  """
  return ml_collections.ConfigDict(dict(_MAMMOREGNET_SIZES[size]))


def synthetic_longitudinal_data(
  c: ml_collections.ConfigDict,
  splits: tuple[int, int, int],
  *,
  seed: int,
  lesion_contrast: float = 0.35,
  missing_prior_fraction: float = 0.0,
  with_displacement: bool = False,
) -> None:
  """``c.data``: the embedded synthetic longitudinal pairs, used while ``data.dir`` is empty.

  Sets ``data.dir`` (empty), ``data.image_size`` (:data:`LONGITUDINAL_IMAGE_SIZE`),
  ``data.num_years`` (5) and ``data.synthetic``, whose ``root`` is the cache directory of the
  generated data (empty: ``$MAMMOJAX_DATA`` or ``~/.cache``).

  Args:
    c: the config to extend.
    splits: number of train, val and test patients.
    seed: the generator's seed; experiments trained on each other's outputs use different
      seeds, so that they see other patients.
    lesion_contrast: brightness of a lesion over the tissue.
    missing_prior_fraction: share of exams without a prior.
    with_displacement: also store each pair's true deformation
      (``synthetic.store_displacement``), which registration experiments score their endpoint
      error against; otherwise that field is left out and no deformation is stored.
  """
  c.data.dir = ""
  c.data.image_size = LONGITUDINAL_IMAGE_SIZE
  c.data.num_years = 5
  s = ml_collections.ConfigDict()
  s.root = ""
  s.num_train, s.num_val, s.num_test = splits
  s.positive_fraction = 0.3
  s.missing_prior_fraction = missing_prior_fraction
  s.deformation_pixels = 4.0
  s.lesion_contrast = lesion_contrast
  if with_displacement:
    s.store_displacement = True
  s.seed = seed
  c.data.synthetic = s


def apply_smoke(
  c: ml_collections.ConfigDict,
  steps: int,
  *,
  every: int | None = None,
  warmup_steps: int | None = 1,
) -> None:
  """The run of a ``:smoke`` variant (seconds on a CPU; what the tests run).

  Args:
    c: the config to change.
    steps: training steps, at batch :data:`SMOKE_BATCH_SIZE` (evaluation too).
    every: evaluate and checkpoint every this many steps (default: once, at the end).
    warmup_steps: learning-rate warmup; None leaves the config's own.

  Logging is every step, without TensorBoard.
  """
  c.train.steps = steps
  c.train.batch_size = SMOKE_BATCH_SIZE
  c.eval.batch_size = SMOKE_BATCH_SIZE
  c.eval.every_steps = c.checkpoint.every_steps = every or steps
  c.logging.every_steps = 1
  c.logging.tensorboard = False
  if warmup_steps is not None:
    c.optim.warmup_steps = warmup_steps


def unknown_variant(path: str, variant: str, known: Sequence[str]) -> ValueError:
  """The error of ``get_config(variant)`` for a variant that the config file ``path`` lacks."""
  quoted = [repr(v) for v in known]
  choices = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
  return ValueError(f"unknown variant {variant!r} of {path}; use {choices}")


# The seed's contrasts for the plain UNETR / UNet (AMAE's fine-tuning inputs): trace-weighted DWI
# and ADC always, T2 when acquired (zeros otherwise).
SEGMENTATION_CONTRASTS = ("TRACE", "ADC", "T2")
SEGMENTATION_REQUIRED = ("TRACE", "ADC")
# Volume sides (D, H, W) of the embedded synthetic set and the training crops, per size.
_SEGMENTATION_SIZES = {
  "default": {"volume": (48, 48, 48), "crop": (32, 32, 32)},
  "smoke": {"volume": (32, 32, 32), "crop": (16, 16, 16)},
  "paper": {"volume": (96, 96, 96), "crop": (96, 96, 96)},
}


def segmentation_experiment(c: ml_collections.ConfigDict, size: str) -> None:
  """``c.task = 'segmentation'`` with the data, loss, evaluation and training of ``size``
  (``'default'``: the synthetic volumes on a CPU in minutes; ``'smoke'``: seconds, the tests;
  ``'paper'``: the seed's fine-tuning on ingested 96^3 volumes). The model section is the
  caller's (configs/unetr.py, configs/unet3d.py)."""
  sides = _SEGMENTATION_SIZES[size]
  c.task = "segmentation"
  c.data.dir = ""  # python -m mammojax.ingest --task=volume ...; empty = synthetic volumes
  c.data.contrasts = SEGMENTATION_CONTRASTS
  c.data.required_contrasts = SEGMENTATION_REQUIRED
  c.data.drop_contrasts = ()  # optional contrasts withheld (zeros, absent), e.g. ("T2",)
  c.data.crop_size = sides["crop"]
  c.data.synthetic = ml_collections.ConfigDict(
    {"root": "", "size": sides["volume"], "num_train": 48, "num_val": 8, "num_test": 8, "seed": 0}
  )
  # Every contrast of the vocabulary is generated (optional ones missing at random); data.contrasts
  # picks the channels.
  c.data.synthetic.contrasts = brain_volumes.CONTRASTS
  # MONAI RandCropByPosNegLabel(pos=1, neg=1), RandFlip / RandRotate90, RandScale / ShiftIntensity.
  c.data.augment = ml_collections.ConfigDict(
    {"pos": 1.0, "neg": 1.0, "flip_p": 0.5, "rotate_p": 0.5}
  )
  c.data.augment.update(intensity_scale=0.1, intensity_shift=0.1)

  # MONAI DiceLoss(to_onehot_y=True, softmax=True) with its defaults; kind 'dice_ce' adds
  # cross-entropy (DiceCELoss).
  c.loss = ml_collections.ConfigDict(
    {"kind": "dice", "include_background": True, "squared_pred": False, "batch": False}
  )
  c.loss.update(smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=1.0, lambda_ce=1.0)

  # Whole volumes by sliding windows of the crop size; figures of the first subjects in reports.
  c.eval.update(overlap=0.5, blend="gaussian", sw_batch_size=4, report_figures=4)
  c.checkpoint.update(best_metric="eval/dice_mean", best_mode="max")
  c.optim.update(name="adamw", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=20)
  c.optim.update(weight_decay=0.05)
  c.train.update(steps=400, batch_size=4)
  c.eval.update(batch_size=4, every_steps=100)
  c.checkpoint.every_steps = 100
  c.logging.every_steps = 20
  if size == "smoke":
    c.data.synthetic.update(num_train=8, num_val=8, num_test=8)
    apply_smoke(c, 2)
  elif size == "paper":
    # The seed's fine-tuning: AdamW lr 1e-4 with a schedule, weight decay 0.05, Dice loss, 200
    # epochs, the best validation checkpoint (1648 training subjects at batch 2: 824 steps per
    # epoch; set to your dataset's).
    steps_per_epoch = 824
    c.train.update(steps=200 * steps_per_epoch, batch_size=2)
    c.optim.update(learning_rate=1e-4, warmup_steps=steps_per_epoch)
    c.eval.update(batch_size=1, every_steps=steps_per_epoch, sw_batch_size=4)
    c.checkpoint.every_steps = steps_per_epoch
    c.logging.every_steps = 50


# AMAE's encoder per size (configs/amae.py pretrains it, configs/amae_unetr.py fine-tunes it: both
# take it from here so that the weights fit). UNETR's patch 16 and 12 blocks everywhere.
_AMAE_ENCODER_SIZES = {
  "default": {"hidden_dim": 96, "num_heads": 4, "mlp_dim": 192},
  "smoke": {"hidden_dim": 24, "num_heads": 2, "mlp_dim": 48},
  "paper": {"hidden_dim": 768, "num_heads": 12, "mlp_dim": 3072},
}


def amae_encoder(size: str) -> ml_collections.ConfigDict:
  """``model.encoder`` of AMAE's contrast encoder at ``size`` (see
  :class:`mammojax.models.amae.encoder.ContrastEncoder`): patch 16 and 12 blocks as UNETR's ViT,
  MONAI's attention without query/key/value biases, SelfMedMAE's sin-cos positions (h, w, d
  order), a learned modality embedding, the tokenizer's ``'scale'`` update ``W * (1 + s)``."""
  e = ml_collections.ConfigDict(dict(_AMAE_ENCODER_SIZES[size]))
  e.update(patch_size=16, depth=12, position_embedding="sincos_hwd", modality_embedding=True)
  e.update(tokenizer_update="scale", qkv_bias=False, layer_norm_epsilon=1e-5)
  e.update(dropout_rate=0.0, remat=False)
  return e
