r"""AMAE fine-tuning: infarct segmentation from few labelled subjects, starting from the encoder
that configs/amae.py pretrained on many unlabelled ones.

The seed's stage 2, both of its routes:

* ``adaptive`` (default): Adaptive UNETR. The tokenizer and the pretrained encoder take each
  acquired contrast as its own tokens; at each of UNETR's skips (blocks 3, 6, 9 and the final
  tokens) a max pool over the contrasts gives one map per location; UNETR's convolutional path on
  the raw volumes runs on each contrast with shared weights and is max-pooled the same way
  (mammojax/models/amae/adaptive_unetr.py). The contrasts TRACE, ADC and T2 are its slots; a
  missing T2 is simply not pooled.
* ``unetr``: the original UNETR with the contrasts concatenated as channels (zeros for a missing
  T2), its ViT initialised from the pretrained encoder: the blocks as they are, the patch
  embedding of the three channels the mean of the three contrasts' tokenizer filters, so its
  token is the mean of the per-contrast tokens the encoder learnt on
  (mammojax/models/amae/transfer.py).

Default: the embedded synthetic volumes of configs/unetr.py with only 12 labelled training
subjects (the same 8 validation subjects, 32 test subjects), a narrow ViT (width 96, UNETR's 12 blocks)
on 32^3 crops. With ``model.pretrained`` empty, the pretraining (configs/amae.py, 160 other,
unlabelled subjects) runs first in WORKDIR/amae:

  python -m mammojax.main --config=configs/amae_unetr.py --workdir=/tmp/amae_unetr
  python -m mammojax.main --config=configs/amae_unetr.py:unetr --workdir=/tmp/amae_plain
  python -m mammojax.evaluate --workdir=/tmp/amae_unetr --split=test

A finished pretraining run elsewhere: ``--config.model.pretrained=/tmp/amae`` (its encoder's
sizes must equal this model's; the error names the field that differs).

Variants (``--config=configs/amae_unetr.py:<parts>``, parts joined by commas):

  adaptive | unetr      the network (default adaptive);
  scratch               no pretraining: the seed's "Adaptive UNETR" / "UNETR" rows;
  smoke | paper         seconds on a CPU (the tests) | the seed's fine-tuning: ViT-B on 96^3
                        crops, AdamW lr 1e-4 with warmup and cosine decay, weight decay 0.05,
                        Dice loss, 200 epochs, the best validation checkpoint.
"""

import os

import ml_collections

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config

NETWORKS = ("adaptive", "unetr")
SIZES = ("smoke", "paper")
VARIANTS = (*NETWORKS, "scratch", *SIZES)
# Labelled training subjects of the default: few, against the 160 unlabelled of the pretraining.
FEW_LABELLED = 12
# Test subjects of the default: enough pairs for the paired Wilcoxon test to say something.
TEST_SUBJECTS = 32
_FEATURE_SIZE = {"default": 8, "smoke": 4, "paper": 16}


def parse_variant(variant: str) -> tuple[str, bool, str]:
  """``(network, pretrained, size)`` of a variant such as ``'unetr,scratch,smoke'``."""
  parts = [p for p in variant.split(",") if p]
  unknown = [p for p in parts if p not in VARIANTS]
  networks = [p for p in parts if p in NETWORKS]
  sizes = [p for p in parts if p in SIZES]
  if unknown or len(networks) > 1 or len(sizes) > 1:
    raise ValueError(
      f"unknown variant {variant!r} of configs/amae_unetr.py; join at most one of {NETWORKS}, "
      f"'scratch' and at most one of {SIZES} with commas, e.g. 'unetr,scratch'"
    )
  return (networks or ["adaptive"])[0], "scratch" not in parts, (sizes or ["default"])[0]


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  network, pretrained, size = parse_variant(variant)
  c = base_config()
  c.name = f"amae_{network}" if pretrained else f"{network}_scratch"
  fragments.segmentation_experiment(c, size)
  if size == "default":
    c.data.synthetic.update(num_train=FEW_LABELLED, num_test=TEST_SUBJECTS)
  encoder = fragments.amae_encoder(size)
  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 2  # background, infarct
  c.model.feature_size = _FEATURE_SIZE[size]
  c.model.dtype = "float32"
  c.model.pretrained = ""  # an AMAE run; empty = the pretrain stage's (or none with 'scratch')
  # Without 'scratch' an empty model.pretrained is an error once the pretrain stage has run.
  c.model.pretrained_required = pretrained
  if network == "adaptive":
    c.model.kind = "adaptive_unetr"
    c.model.encoder = encoder
  else:
    c.model.kind = "unetr"
    c.model.update(hidden_size=encoder.hidden_dim, mlp_dim=encoder.mlp_dim)
    c.model.update(num_heads=encoder.num_heads, qkv_bias=encoder.qkv_bias)
    c.model.update(dropout_rate=0.0, remat=size == "paper")
  if pretrained and size != "paper":  # paper: point model.pretrained at your pretraining run
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.amae = ml_collections.ConfigDict(
      {
        "config": os.path.join(os.path.dirname(os.path.abspath(__file__)), "amae.py"),
        "variant": "smoke" if size == "smoke" else "",
        "link": "model.pretrained",
      }
    )
  if size == "paper" and network == "adaptive":
    c.model.encoder.remat = True
  return c
