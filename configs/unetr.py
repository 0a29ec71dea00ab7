r"""UNETR 3-D segmentation (MONAI's UNETR layout) of infarcts in multi-contrast brain MRI.

The plain-UNETR route of the seed (AMAE): the contrasts TRACE, ADC and T2 are the input channels,
a missing T2 is a channel of zeros. Default: the embedded synthetic volumes (48^3, 32^3 crops) and
a narrow ViT (width 96, 4 heads; UNETR's 12 blocks and its taps 3, 6, 9) that train on a CPU in
minutes:

  python -m mammojax.main --config=configs/unetr.py --workdir=/tmp/unetr
  python -m mammojax.evaluate --workdir=/tmp/unetr --split=test

evaluate writes Dice, HD95 and volume differences per subject (subjects.csv), their means with
the number of subjects skipped for an empty ground truth (report.json), and slice figures.

Variants (``--config=configs/unetr.py:<variant>``):

  smoke  seconds on a CPU; what the tests run.
  paper  the seed's fine-tuning: 96^3 crops, ViT-B (768 wide, 12 heads, MLP 3072), feature
         size 16, AdamW lr 1e-4 with warmup and cosine decay, weight decay 0.05, Dice loss, 200
         epochs, the best validation checkpoint. Point it at ingested volumes:
           python -m mammojax.ingest volumes.csv --images=/data/mri --task=volume \
             --out=/data/stroke_records
           python -m mammojax.main --config=configs/unetr.py:paper --workdir=RUN \
             --config.data.dir=/data/stroke_records

A MONAI checkpoint converted with ``python -m mammojax.convert unetr FILE --out=DIR`` starts a
run with ``--config.init_from=DIR``. ``--config.model.remat=True`` recomputes each ViT block in
the backward pass (less memory at 96^3), ``--config.model.dtype=bfloat16`` computes in bf16.
"""

import ml_collections

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config

VARIANTS = ("smoke", "paper")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant and variant not in VARIANTS:
    raise fragments.unknown_variant("configs/unetr.py", variant, VARIANTS)
  size = variant or "default"
  c = base_config()
  c.name = "unetr"
  fragments.segmentation_experiment(c, size)
  c.model = ml_collections.ConfigDict()
  c.model.kind = "unetr"
  c.model.num_classes = 2  # background, infarct
  c.model.update(hidden_size=96, mlp_dim=192, num_heads=4, feature_size=8)
  c.model.update(dropout_rate=0.0, qkv_bias=False, remat=False, dtype="float32")
  if size == "smoke":
    c.model.update(hidden_size=24, mlp_dim=48, num_heads=2, feature_size=4)
  elif size == "paper":
    c.model.update(hidden_size=768, mlp_dim=3072, num_heads=12, feature_size=16)
  return c
