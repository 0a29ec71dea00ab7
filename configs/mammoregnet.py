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

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "mammoregnet"
  c.task = "mammoregnet"

  # Seed 1: other patients than ImgFeatAlign's training set.
  fragments.synthetic_longitudinal_data(c, (1024, 128, 128), seed=1, with_displacement=True)

  c.model = ml_collections.ConfigDict()
  # The reference widths; one Swin block per stage instead of its four keeps the default run to
  # CPU minutes (``:paper`` has the reference's four).
  c.model.registration = fragments.mammoregnet_network()
  c.model.regularity_weight = 1.0
  c.model.jacobian_weight = 1e-5

  c.train.update(steps=300, batch_size=8)
  c.eval.update(batch_size=32, every_steps=100)
  c.optim.update(learning_rate=3e-4, warmup_steps=20, weight_decay=0.0)
  c.checkpoint.update(every_steps=100, best_metric="eval/epe", best_mode="min")
  c.logging.every_steps = 20

  if variant == "smoke":
    c.data.image_size = fragments.SMOKE_IMAGE_SIZE
    c.data.synthetic.update(num_train=16, num_val=8, num_test=8)
    c.model.registration = fragments.mammoregnet_network("smoke")
    fragments.apply_smoke(c, 3)
  elif variant == "paper":
    c.data.image_size = fragments.PAPER_IMAGE_SIZE
    c.model.registration = fragments.mammoregnet_network("paper")
    c.train.update(batch_size=8, steps=20000)
    c.optim.learning_rate = 1e-4
    c.eval.every_steps = c.checkpoint.every_steps = 1000
  elif variant:
    raise fragments.unknown_variant("configs/mammoregnet.py", variant, ("", "smoke", "paper"))
  return c
