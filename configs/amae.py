r"""AMAE pretraining: a masked autoencoder over every acquired contrast of multi-contrast brain MRI.

The seed's stage 1: each subject brings up to seven contrasts (ADC, TRACE, T2, GRE, SWI, T1,
FLAIR; ``data.contrasts`` is the vocabulary, in slot order), each is tokenised by its own filter
of the Dynamic Convolution Tokenizer, 70% of each contrast's patches are masked, and a ViT encoder
sees the visible tokens of all contrasts as one sequence; a lighter decoder reconstructs the
masked patches of every acquired contrast. Default: many unlabelled synthetic volumes (160
subjects of 48^3, seed 1: other subjects than the fine-tuning set of configs/amae_unetr.py),
32^3 crops, patch 16 and UNETR's 12 blocks at width 96, on a CPU in minutes:

  python -m mammojax.main --config=configs/amae.py --workdir=/tmp/amae
  python -m mammojax.evaluate --workdir=/tmp/amae --split=test

evaluate writes the masked-patch loss and, per subject, the seed's Figure 2 (for each contrast a
slice of the original, the masked input and the reconstruction). Fine-tune with
configs/amae_unetr.py, which runs this pretraining first when it has none.

Variants (``--config=configs/amae.py:<variant>``):

  smoke  seconds on a CPU; what the tests run.
  paper  the seed's pretraining: ViT-B (768 wide, 12 blocks, 12 heads) on 96^3 crops, AdamW lr
         1e-5, weight decay 0.05, batch 4, 500 epochs (45,374 studies: 11,344 steps per epoch;
         set to your dataset's). Point it at ingested volumes:
           python -m mammojax.ingest volumes.csv --images=/data/mri --task=volume \
             --out=/data/mri_records
           python -m mammojax.main --config=configs/amae.py:paper --workdir=RUN \
             --config.data.dir=/data/mri_records

Choices the seed leaves open, each a field (the reasons are those of the modules named):

  model.encoder.tokenizer_update  'scale': W_k = W * (1 + s_w[k]), b_k = b * (1 + s_b[k]) with
      [s_w, s_b] = Linear(one-hot(k)), the projector starting at zero; 'moddrop' (W * s, ModDrop++)
      spans the same filters but decays towards a dead filter; 'shift' (W + s). The modality
      vector is one-hot over data.contrasts (mammojax/nn/dynamic_tokenizer.py).
  model.shared_mask  False: each contrast's patches are masked independently (the seed masks "in
      each modality's volume"), so a location hidden in one contrast is often visible in another
      and the model learns to translate between contrasts; True masks the same locations.
  model.mask_ratio  0.7, the seed's.
  model.decoder  dim 384, 8 blocks, 12 heads at paper size (SelfMedMAE's 3-D MAE decoder); at
      the CPU default 48 wide, 2 blocks.
  model.encoder.position_embedding  SelfMedMAE's fixed sin-cos table (h, w, d order), the same
      at the same location of every contrast; a learned modality embedding per contrast is added
      to the encoder's tokens and, again, to the decoder's.
  class token  none: UNETR's encoder has none, so every pretrained weight is used downstream.
  model.normalize_target  False: the loss is the plain L2 on the (z-scored) voxels of the masked
      patches, each masked patch of an acquired contrast weighing the same; True uses SelfMedMAE's
      per-patch normalised targets. On the synthetic default the normalised target's loss stayed at
      that of predicting zeros (1.0) through 750 steps, while the plain L2 fell steadily.
  optim  AdamW with linear warmup and cosine decay (the seed names only the optimiser, lr and
      weight decay); betas (0.9, 0.95) as SelfMedMAE's.
"""

import ml_collections

from mammojax.data.synthetic import brain_volumes
from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config

VARIANTS = ("smoke", "paper")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant and variant not in VARIANTS:
    raise fragments.unknown_variant("configs/amae.py", variant, VARIANTS)
  size = variant or "default"
  c = base_config()
  c.name = "amae"
  c.task = "amae"
  c.data.dir = ""  # python -m mammojax.ingest --task=volume ...; empty = synthetic volumes
  c.data.contrasts = brain_volumes.CONTRASTS
  c.data.crop_size = (32, 32, 32)
  c.data.synthetic = ml_collections.ConfigDict(
    {"root": "", "size": (48, 48, 48), "num_train": 160, "num_val": 8, "num_test": 8, "seed": 1}
  )
  c.data.synthetic.contrasts = brain_volumes.CONTRASTS
  c.data.augment = ml_collections.ConfigDict(
    {"flip_p": 0.5, "rotate_p": 0.5, "intensity_scale": 0.1, "intensity_shift": 0.1}
  )

  c.model = ml_collections.ConfigDict()
  c.model.kind = "amae"
  c.model.encoder = fragments.amae_encoder(size)
  c.model.decoder = ml_collections.ConfigDict({"dim": 48, "depth": 2, "heads": 4, "mlp_dim": 96})
  c.model.update(mask_ratio=0.7, shared_mask=False, normalize_target=False, dtype="float32")

  c.optim.update(name="adamw", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=40)
  c.optim.update(weight_decay=0.05, b1=0.9, b2=0.95)
  c.train.update(steps=1000, batch_size=8)
  c.eval.update(batch_size=8, every_steps=250, report_figures=4)
  c.checkpoint.every_steps = 250
  c.checkpoint.update(best_metric="eval/loss", best_mode="min")
  c.logging.every_steps = 20
  if size == "smoke":
    c.data.synthetic.update(size=(32, 32, 32), num_train=8, num_val=8, num_test=8)
    c.model.decoder.update(dim=12, depth=1, heads=2, mlp_dim=24)
    fragments.apply_smoke(c, 2)
  elif size == "paper":
    steps_per_epoch = 11344
    c.data.crop_size = (96, 96, 96)
    c.model.decoder.update(dim=384, depth=8, heads=12, mlp_dim=1536)
    c.model.encoder.remat = True
    c.train.update(steps=500 * steps_per_epoch, batch_size=4)
    c.optim.update(learning_rate=1e-5, warmup_steps=steps_per_epoch)
    c.eval.update(batch_size=4, every_steps=steps_per_epoch)
    c.checkpoint.every_steps = steps_per_epoch
    c.logging.every_steps = 100
  return c
