r"""MammoRegNet: deformable registration of a prior mammogram to the current one.

Trained with its published loss (NCC of the warped and of the affine-warped prior with the
current image, gradient smoothness, a penalty on negative Jacobian determinants) on the synthetic
longitudinal pairs, whose true deformation is known, so evaluation reports the endpoint error
(``eval/epe``, against ``eval/epe_identity`` for no registration), NCC and fold counts.

  python -m mammojax.main --config=configs/mammoregnet.py --workdir=/tmp/mammoregnet

The trained run then serves ImgFeatAlign as its frozen registration network:

  python -m mammojax.main --config=configs/imgfeatalign.py --workdir=/tmp/imgfeatalign \
      --config.model.registration_checkpoint=/tmp/mammoregnet

Variants: ``smoke`` (seconds; tests), ``paper`` (512x416, the reference's four Swin blocks per
stage; point --config.data.dir at ingested longitudinal data).
"""

import ml_collections

from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "mammoregnet"
  c.task = "mammoregnet"

  c.data.dir = ""
  c.data.image_size = (128, 96)  # must match the ImgFeatAlign config that uses it
  c.data.num_years = 5
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.root = ""
  c.data.synthetic.num_train = 1024
  c.data.synthetic.num_val = 128
  c.data.synthetic.num_test = 128
  c.data.synthetic.positive_fraction = 0.3
  c.data.synthetic.missing_prior_fraction = 0.0
  c.data.synthetic.deformation_pixels = 4.0
  c.data.synthetic.lesion_contrast = 0.35
  c.data.synthetic.store_displacement = True
  c.data.synthetic.seed = 1  # other patients than ImgFeatAlign's training set

  c.model = ml_collections.ConfigDict()
  # The reference widths; one Swin block per stage instead of its four keeps the default run to
  # CPU minutes (``:paper`` has the reference's four).
  c.model.registration = ml_collections.ConfigDict(
    {"enc_channels": 8, "dec_channels": 16, "num_layers": 1, "window_size": (5, 5)}
  )
  c.model.regularity_weight = 1.0
  c.model.jacobian_weight = 1e-5

  c.train.steps = 300
  c.train.batch_size = 8
  c.eval.batch_size = 32
  c.eval.every_steps = 100
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.checkpoint.every_steps = 100
  c.checkpoint.best_metric = "eval/epe"
  c.checkpoint.best_mode = "min"
  c.logging.every_steps = 20

  if variant == "smoke":
    c.data.image_size = (32, 32)
    c.data.synthetic.num_train = 16
    c.data.synthetic.num_val = 8
    c.data.synthetic.num_test = 8
    c.model.registration = ml_collections.ConfigDict(
      {"enc_channels": 4, "dec_channels": 8, "num_layers": 1, "window_size": (5, 5)}
    )
    c.train.steps = 3
    c.train.batch_size = 8
    c.eval.batch_size = 8
    c.eval.every_steps = 3
    c.checkpoint.every_steps = 3
    c.logging.every_steps = 1
    c.logging.tensorboard = False
    c.optim.warmup_steps = 1
  elif variant == "paper":
    c.data.image_size = (512, 416)
    c.model.registration.num_layers = 4
    c.train.batch_size = 8
    c.train.steps = 20000
    c.optim.learning_rate = 1e-4
    c.eval.every_steps = 1000
    c.checkpoint.every_steps = 1000
  elif variant:
    raise ValueError(
      f"unknown variant {variant!r} of configs/mammoregnet.py; use '', 'smoke' or 'paper'"
    )
  return c
