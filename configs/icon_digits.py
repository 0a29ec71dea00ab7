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

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "icon_digits"
  c.task = "icon_digits"

  c.data.update(source="auto", tfds_data_dir="")  # source: 'auto' | 'mnist' | 'sklearn'
  c.data.update(size=28, train_digit=5, eval_digit=7)
  c.data.update(num_train=4096, num_val=256, num_test=256, seed=0)

  c.model = ml_collections.ConfigDict()
  c.model.hidden = 50
  c.model.num_steps = 9  # the seed: the network, then eight TwoStepRegistration compositions
  # Diffusion at icon_registration's scale (convention='icon'): 0.05 weighs it as there.
  c.model.lmbda = 0.05

  c.train.update(steps=600, batch_size=128)
  c.eval.update(batch_size=128, every_steps=200, figure_examples=6)
  c.optim.update(name="adam", learning_rate=1e-3, schedule="constant", warmup_steps=0)
  c.optim.update(weight_decay=0.0, clip_grad_norm=0.0)
  c.checkpoint.update(every_steps=200, best_metric="eval/similarity", best_mode="min")
  c.logging.every_steps = 50

  if variant == "smoke":
    c.data.update(size=16, num_train=32, num_val=8, num_test=8)
    c.model.update(hidden=8, num_steps=3)
    fragments.apply_smoke(c, 3, warmup_steps=None)
    c.eval.figure_examples = 2
  elif variant:
    raise fragments.unknown_variant("configs/icon_digits.py", variant, ("", "smoke"))
  return c
