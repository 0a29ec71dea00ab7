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
