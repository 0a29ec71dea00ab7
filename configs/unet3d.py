r"""3-D UNet baseline (MONAI's BasicUNet layout) for infarct segmentation, the seed's "UNET" row.

Same data, loss and evaluation as configs/unetr.py (TRACE, ADC and T2 as channels, a missing T2
as zeros; Dice loss; sliding-window evaluation):

  python -m mammojax.main --config=configs/unet3d.py --workdir=/tmp/unet3d
  python -m mammojax.evaluate --workdir=/tmp/unet3d --split=test

Variants: ``smoke`` (seconds; tests) and ``paper`` (the seed's fine-tuning settings at 96^3 with
MONAI's default BasicUNet widths (32, 32, 64, 128, 256, 32); ``--config.data.dir`` names ingested
volumes). A MONAI BasicUNet converted with ``python -m mammojax.convert unet3d FILE --out=DIR``
starts a run with ``--config.init_from=DIR``.
"""

import ml_collections

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config

VARIANTS = ("smoke", "paper")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant and variant not in VARIANTS:
    raise fragments.unknown_variant("configs/unet3d.py", variant, VARIANTS)
  size = variant or "default"
  c = base_config()
  c.name = "unet3d"
  fragments.segmentation_experiment(c, size)
  c.model = ml_collections.ConfigDict()
  c.model.kind = "unet"
  c.model.num_classes = 2  # background, infarct
  c.model.features = (8, 8, 16, 32, 64, 8)
  c.model.update(dropout_rate=0.0, dtype="float32")
  if size == "smoke":
    c.model.features = (4, 4, 4, 8, 8, 4)
  elif size == "paper":
    c.model.features = (32, 32, 64, 128, 256, 32)
  return c
