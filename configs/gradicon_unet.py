r"""GradICON-style 2D U-Net registration (ICON's tallUNet2, LNCC + GradICON), for your images.

By default it trains on the synthetic longitudinal mammogram pairs (prior -> current; the true
field is known, so ``eval/epe`` is the endpoint error against ``eval/epe_identity``). For your
own PNG / DICOM images:

  python -m mammojax.main --config=configs/gradicon_unet.py --workdir=/tmp/gradicon \
      --config.data.image_dir=/data/pngs [--config.data.pairs_csv=pairs.csv]
  python -m mammojax.register --fixed a.png --moving b.png --out /tmp/r --model /tmp/gradicon

``pairs.csv`` has columns ``moving,fixed[,split]`` (paths relative to ``image_dir``); without it,
random pairs are drawn within each split's share of the directory (80/10/10 by sorted name).
Weights converted from GradICON (``python -m mammojax.convert icon``) initialise the network with
``--config.init_from=DIR`` when the sizes match. Variants: ``smoke`` (seconds; tests).
"""

import ml_collections

from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "gradicon_unet"
  c.task = "gradicon_unet"

  c.data.image_dir = ""
  c.data.pairs_csv = ""
  c.data.num_pairs = 1024
  c.data.num_eval_pairs = 64
  # Synthetic longitudinal pairs (when image_dir is empty).
  c.data.dir = ""
  c.data.image_size = (128, 96)
  c.data.num_years = 5
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.root = ""
  c.data.synthetic.num_train = 1024
  c.data.synthetic.num_val = 64
  c.data.synthetic.num_test = 64
  c.data.synthetic.positive_fraction = 0.3
  c.data.synthetic.missing_prior_fraction = 0.0
  c.data.synthetic.deformation_pixels = 4.0
  c.data.synthetic.lesion_contrast = 0.35
  c.data.synthetic.store_displacement = True
  c.data.synthetic.seed = 2

  c.model = ml_collections.ConfigDict()
  # ICON's tallUNet2 for one-channel images.
  c.model.down_features = (2, 16, 32, 64, 256, 512)
  c.model.up_features = (16, 32, 64, 128, 256)
  c.model.num_steps = 1  # U-Net steps composed with TwoStepRegistration
  c.model.lmbda = 1.5  # GradICON's weight (ICON's training scripts)
  c.model.lncc_sigma = 4.0  # pixels (ICON's LNCC(sigma=4))

  c.train.steps = 2000
  c.train.batch_size = 8
  c.eval.batch_size = 16
  c.eval.every_steps = 500
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.checkpoint.every_steps = 500
  c.checkpoint.best_metric = "eval/lncc"
  c.checkpoint.best_mode = "min"
  c.logging.every_steps = 50

  if variant == "smoke":
    c.data.image_size = (32, 32)
    c.data.num_pairs = 8
    c.data.num_eval_pairs = 4
    c.data.synthetic.num_train = 8
    c.data.synthetic.num_val = 4
    c.data.synthetic.num_test = 4
    c.model.down_features = (2, 4, 8)
    c.model.up_features = (4, 8)
    c.train.steps = 2
    c.train.batch_size = 8  # divisible by the 8 fake devices of the tests
    c.eval.batch_size = 8
    c.eval.every_steps = 2
    c.checkpoint.every_steps = 2
    c.logging.every_steps = 1
    c.logging.tensorboard = False
    c.optim.warmup_steps = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/gradicon_unet.py; use '' or 'smoke'")
  return c
