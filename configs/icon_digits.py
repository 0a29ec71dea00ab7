r"""ICON digits demo (seed 001): an eight-times-composed MLP registers pairs of one digit class.

The network is the seed's: ``Dense(50) -> relu -> Dense(50) -> relu -> Dense(H * W * 2)`` on
the flattened pair, last layer zero-initialised (so training starts at the identity), turned into
a transform and composed with itself eight times (nine applications, shared weights), trained
with ICON's diffusion-regularised SSD, ``lmbda = 0.05``, on pairs of 5s and evaluated on pairs of
7s. Data: MNIST from a locally prepared TFDS directory if there is one
(``--config.data.tfds_data_dir``), otherwise scikit-learn's bundled 8x8 digits upsampled to
28x28; nothing is downloaded.

  python -m mammojax.main --config=configs/icon_digits.py --workdir=/tmp/icon_digits
  python -m mammojax.evaluate --workdir=/tmp/icon_digits --split=test   # + registration.png

``metrics.jsonl`` has ``eval/similarity`` (SSD after registration) and
``eval/similarity_identity`` (SSD with no transform). Variants: ``smoke`` (seconds; tests).
"""

import ml_collections

from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "icon_digits"
  c.task = "icon_digits"

  c.data.source = "auto"  # 'auto' | 'mnist' | 'sklearn'
  c.data.tfds_data_dir = ""
  c.data.size = 28
  c.data.train_digit = 5
  c.data.eval_digit = 7
  c.data.num_train = 4096
  c.data.num_val = 256
  c.data.num_test = 256
  c.data.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.hidden = 50
  c.model.num_steps = 9  # the seed: the network, then eight TwoStepRegistration compositions
  c.model.lmbda = 0.05

  c.train.steps = 600
  c.train.batch_size = 128
  c.eval.batch_size = 128
  c.eval.every_steps = 200
  c.eval.figure_examples = 6
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.clip_grad_norm = 0.0
  c.checkpoint.every_steps = 200
  c.checkpoint.best_metric = "eval/similarity"
  c.checkpoint.best_mode = "min"
  c.logging.every_steps = 50

  if variant == "smoke":
    c.data.size = 16
    c.data.num_train = 32
    c.data.num_val = 8
    c.data.num_test = 8
    c.model.hidden = 8
    c.model.num_steps = 3
    c.train.steps = 3
    c.train.batch_size = 8
    c.eval.batch_size = 8
    c.eval.every_steps = 3
    c.eval.figure_examples = 2
    c.checkpoint.every_steps = 3
    c.logging.every_steps = 1
    c.logging.tensorboard = False
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/icon_digits.py; use '' or 'smoke'")
  return c
