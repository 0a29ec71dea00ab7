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

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "gradicon_unet"
  c.task = "gradicon_unet"

  c.data.update(image_dir="", pairs_csv="", num_pairs=1024, num_eval_pairs=64)
  # Synthetic longitudinal pairs (when image_dir is empty).
  fragments.synthetic_longitudinal_data(c, (1024, 64, 64), seed=2, with_displacement=True)

  c.model = ml_collections.ConfigDict()
  # ICON's tallUNet2 for one-channel images.
  c.model.down_features = (2, 16, 32, 64, 256, 512)
  c.model.up_features = (16, 32, 64, 128, 256)
  c.model.num_steps = 1  # U-Net steps composed with TwoStepRegistration
  c.model.lmbda = 1.5  # GradICON's weight (ICON's training scripts)
  c.model.lncc_sigma = 4.0  # pixels (ICON's LNCC(sigma=4))

  c.train.update(steps=2000, batch_size=8)
  c.eval.update(batch_size=16, every_steps=500)
  c.optim.update(name="adam", learning_rate=1e-4, warmup_steps=50, weight_decay=0.0)
  c.checkpoint.update(every_steps=500, best_metric="eval/lncc", best_mode="min")
  c.logging.every_steps = 50

  if variant == "smoke":
    c.data.image_size = fragments.SMOKE_IMAGE_SIZE
    c.data.update(num_pairs=8, num_eval_pairs=4)
    c.data.synthetic.update(num_train=8, num_val=4, num_test=4)
    c.model.update(down_features=(2, 4, 8), up_features=(4, 8))
    fragments.apply_smoke(c, 2)
  elif variant:
    raise fragments.unknown_variant("configs/gradicon_unet.py", variant, ("", "smoke"))
  return c
