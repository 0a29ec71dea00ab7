r"""ImgFeatAlign: longitudinal breast-cancer risk from a current and a prior mammogram.

The prior's encoder features are aligned to the current ones with the deformation field of a
frozen MammoRegNet, compared, and fused by temporal attention into cumulative 1..5-year risk.

Default (trains on the embedded synthetic longitudinal data, ~17 minutes on a 2-core CPU; first trains
the MammoRegNet it uses, configs/mammoregnet.py, into WORKDIR/registration, unless
--config.model.registration_checkpoint names one):

  python -m mammojax.main --config=configs/imgfeatalign.py --workdir=/tmp/imgfeatalign

Variants (``--config=configs/imgfeatalign.py:<variant>``):

  smoke   seconds on a CPU; what the tests run.
  paper   the reference's settings for real data (512x416, batch 8, lr 5e-5, weight decay
          1e-4, plateau schedule, 30 epochs, early stopping). Point it at ingested data:
            python -m mammojax.main --config=configs/imgfeatalign.py:paper --workdir=DIR \
              --config.data.dir=/data/ingested --config.model.registration_checkpoint=REG \
              --config.init_from=CONVERTED_BCRBENCH

Ablations (same seeds): --config.model.align=False (identity flow), --config.model.use_prior=False,
--config.model.use_time_encoding=False. --config.model.bcrbench_flow_compat=True reproduces
BCRBench's flow-channel reading bit for bit.
"""

import os

import ml_collections

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "imgfeatalign"
  c.task = "imgfeatalign"

  # data.dir: an ingested dataset (python -m mammojax.ingest); empty = synthetic.
  fragments.synthetic_longitudinal_data(
    c, (2048, 256, 512), seed=0, lesion_contrast=0.45, missing_prior_fraction=0.05
  )

  # Host-side augmentation of training pairs (same transform for current and prior). Mirroring
  # is off by default: ingestion puts every chest wall on the left.
  c.data.augment = ml_collections.ConfigDict(
    {
      "enabled": True,
      "flip_p": 0.0,
      "rotation_deg": 3.0,
      "scale": 0.03,
      "shift": 0.02,
      "contrast": 0.1,
      "brightness": 0.1,
    }
  )

  c.model = ml_collections.ConfigDict()
  # Mirai's ResNet-18 is 64/128/256/512 wide (``:paper``); a quarter of that keeps the synthetic
  # default to CPU minutes.
  c.model.encoder_width = 16
  c.model.finetune_all = True
  c.model.num_heads = 8
  c.model.dropout_rate = 0.1
  c.model.update(max_time=5.0, time_steps=240, time_dropout_rate=0.1)
  c.model.update(align=True, use_prior=True, use_time_encoding=True, bcrbench_flow_compat=False)
  c.model.warp_impl = "gather"
  c.model.head_weights = {"fused": 1.0, "cur": 0.2, "pri": 0.2}
  # The MammoRegNet that configs/mammoregnet.py trains.
  c.model.registration = fragments.mammoregnet_network()
  # A converted MammoRegNet (python -m mammojax.convert mammoregnet ...) or a configs/mammoregnet.py
  # run directory. Empty: python -m mammojax.main first trains configs/mammoregnet.py into
  # WORKDIR/registration (see c.pretrain) and uses that.
  c.model.registration_checkpoint = ""
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.registration = ml_collections.ConfigDict(
    {
      "config": os.path.join(os.path.dirname(os.path.abspath(__file__)), "mammoregnet.py"),
      "variant": "",
      "link": "model.registration_checkpoint",
    }
  )

  c.train.update(steps=800, batch_size=16)
  # The registration network (and the encoder unless finetune_all) are frozen by the task.
  c.eval.update(batch_size=32, every_steps=200)
  c.optim.update(learning_rate=3e-4, warmup_steps=50, weight_decay=1e-4)
  c.checkpoint.update(every_steps=200, best_metric="eval/c_index", best_mode="max")
  c.logging.every_steps = 20

  if variant == "smoke":
    c.data.image_size = fragments.SMOKE_IMAGE_SIZE
    c.data.synthetic.update(num_train=32, num_val=16, num_test=16, positive_fraction=0.5)
    c.model.update(encoder_width=8, num_heads=2)
    c.model.registration = fragments.mammoregnet_network("smoke")
    fragments.apply_smoke(c, 4, every=2)
    c.pretrain.registration.variant = "smoke"
  elif variant == "paper":
    del c.pretrain["registration"]  # real data: bring a trained MammoRegNet
    c.data.image_size = fragments.PAPER_IMAGE_SIZE
    c.model.encoder_width = 64
    c.model.registration = fragments.mammoregnet_network("paper")
    c.model.finetune_all = False
    # 30 epochs of ~8k pairs; set to your dataset's steps.
    c.train.update(batch_size=8, steps=30 * 1000)
    c.optim.update(learning_rate=5e-5, weight_decay=1e-4, schedule="constant", warmup_steps=0)
    c.optim.plateau.update(enabled=True, factor=0.1, patience=2, accumulation_steps=1000)
    c.eval.update(every_steps=1000, batch_size=8, early_stopping_patience=5)
    c.checkpoint.every_steps = 1000
  elif variant:
    raise fragments.unknown_variant("configs/imgfeatalign.py", variant, ("", "smoke", "paper"))
  return c
