r"""FPN-MIL: multi-scale attention-based MIL for lesion classification in mammograms.

Images are cut into patches; EfficientNet + FPN feature-map pixels at strides 16, 32 and 128 are
the instances of one bag per scale; per-scale instance encoders and pooling, a gated-attention
scale aggregator and deep supervision classify the image (mass / suspicious calcification).

Default: trains on the embedded synthetic mammograms (masses as blobs, calcifications as
clusters of bright specks, with boxes) on a CPU in minutes. To fit a CPU it is NOT the paper's
model size: 192x128 images, 64-pixel patches (6 per image), an EfficientNet of width/depth 0.25
trained from scratch (no Mammo-CLIP weights offline), 32-wide FPN and head. The label is 'Mass'
(--config.data.label=Suspicious_Calcification for the clusters):

  python -m mammojax.main --config=configs/fpn_mil.py --workdir=/tmp/fpn_mil
  python -m mammojax.evaluate --workdir=/tmp/fpn_mil --split=test --threshold=youden:val

Every evaluation (val, every 100 steps) logs the AUC (also per scale); balanced accuracy, F1,
sensitivity and specificity at ``eval.threshold`` (0.5) and at the split's Youden threshold
(``eval/youden_threshold``, ``eval/<metric>_youden``); and lesion detection from the attention
heatmaps, ``eval/detection_<16|32|128|aggregated>_<mean_iou|recall_iou<t>|precision_iou<t>>``
over at most ``eval.detection.max_examples`` positive examples
(``--config.eval.detection.in_periodic_eval=False`` skips it). The evaluate command above applies
val's Youden threshold to the test split; its report.json names the threshold it used and scores
detection on every positive example, with overlay pictures.

The attention tends to pick the patch that holds the lesion but not the lesion within the
64-pixel patch, so the detection IoUs stay low. The encoder's batch norm uses momentum 0.9: with
Mammo-CLIP's 0.99 its running averages lag the from-scratch weights and the evaluation-mode AUC
stays near chance until the learning rate has decayed. Measured runs (wall time, AUC, detection,
seeds): benchmarks/RESULTS.md.

Variants (``--config=configs/fpn_mil.py:<variant>``):

  smoke    seconds on a CPU; what the tests run.
  calc     the reference's best calcification model (FPN + ISAB + PMA, layer norm, gated scale
           aggregator, deep supervision, scales 16/32/128, weighted BCE) on real data.
  mass     the reference's best mass model (FPN + MLP + gated attention).
  offline  the default model's MIL head trained on stored features; first
             python -m mammojax.extract_features --config=configs/fpn_mil.py \
               --workdir=/tmp/fpn_mil --out=/tmp/fpn_mil_features
           then
             python -m mammojax.main --config=configs/fpn_mil.py:offline --workdir=/tmp/offline \
               --config.data.features_dir=/tmp/fpn_mil_features

calc / mass expect an ingested VinDr-style dataset (python -m mammojax.ingest mil ...) with
1520x912 images (Mammo-CLIP's preprocessing) and the Mammo-CLIP EfficientNet-B2 converted to a
variables directory (``--config.model.backbone_checkpoint``):

  python -m mammojax.main --config=configs/fpn_mil.py:calc --workdir=RUN \
    --config.data.dir=/data/vindr_mil --config.model.backbone_checkpoint=/ckpt/mammoclip_b2

Lesion-detection analysis as in the reference uses overlapping patches, e.g.
``--config.data.overlap=0.75`` with ``python -m mammojax.evaluate``.
"""

import ml_collections

from mammojax.losses.mil import VINDR_CALCIFICATION_POS_WEIGHT, VINDR_MASS_POS_WEIGHT
from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "fpn_mil"
  c.task = "fpn_mil"

  c.data.dir = ""  # an ingested MIL dataset (python -m mammojax.ingest mil); empty = synthetic
  c.data.features_dir = ""  # stored features (python -m mammojax.extract_features): offline mode
  c.data.mode = "auto"  # offline iff features_dir; "offline" makes features_dir required
  c.data.label = "Mass"  # or "Suspicious_Calcification"
  c.data.image_size = (192, 128)  # (H, W) of every image of the dataset
  c.data.update(patch_size=64, overlap=0.0)
  c.data.min_foreground = 0.0  # patches with no breast pixel are dropped
  c.data.background_threshold = 0.05
  c.data.channels = 1  # 3 for Mammo-CLIP weights
  c.data.update(max_boxes=8, thumbnail_stride=1)
  # The synthetic mammograms; root: cache dir for generated data (empty = $MAMMOJAX_DATA or
  # ~/.cache).
  c.data.synthetic = ml_collections.ConfigDict(
    {
      "root": "",
      "num_train": 512,
      "num_val": 128,
      "num_test": 128,
      "mass_fraction": 0.4,
      "calc_fraction": 0.4,
      "mass_radius": (5.0, 9.0),
      "mass_contrast": 0.3,
      "calc_spots": (6, 12),
      "calc_cluster_radius": 7.0,
      "calc_contrast": 0.6,
      "seed": 0,
    }
  )

  c.model = ml_collections.ConfigDict()
  c.model.backbone = ml_collections.ConfigDict()
  c.model.backbone.width = 0.25  # B2: 1.1
  c.model.backbone.depth = 0.25  # B2: 1.2
  c.model.backbone.static_padding_size = ()  # Mammo-CLIP: (260, 260)
  c.model.backbone.drop_connect_rate = 0.0
  # Running averages that keep up with a from-scratch encoder (Mammo-CLIP: 0.99).
  c.model.backbone.batch_norm_momentum = 0.9
  # Depthwise-conv lowering: shifted multiply-adds on CPU (much faster there), native elsewhere.
  c.model.backbone.depthwise_impl = "auto"  # "auto" | "conv" | "taps"
  c.model.backbone_trainable = True  # no pretrained encoder for the synthetic default
  c.model.frozen_backbone_batch_stats = False
  c.model.backbone_checkpoint = ""  # converted Mammo-CLIP EfficientNet variables
  c.model.fpn = ml_collections.ConfigDict({"features": 32, "top_down": True, "group_norm": False})
  c.model.head = ml_collections.ConfigDict(
    {
      "scales": (16, 32, 128),
      "encoder_type": "mlp",
      "encoder_features": 32,
      "encoder_dropout": 0.0,
      "num_encoder_blocks": 2,
      "encoder_heads": 4,
      "num_inducing": (),  # ISAB inducing points per scale; () = the reference's rule
      "layer_norm": False,
      "pooling_type": "gated-attention",
      "attention_hidden": 32,
      "attention_dropout": 0.0,
      "pma_heads": 1,
      "scale_aggregator": "gated-attention",
      "deep_supervision": True,
      "classifier_dropout": 0.0,
    }
  )

  c.loss = ml_collections.ConfigDict()
  c.loss.pos_weight = 1.0
  c.loss.pos_weight_from_data = True  # negatives / positives of the training split
  c.loss.side_weight = 1.0

  c.train.update(steps=600, batch_size=8)
  c.eval.update(batch_size=16, every_steps=100)
  c.eval.threshold = 0.5  # also reported: the split's Youden threshold and metrics at it
  c.eval.num_overlays = 8
  c.eval.detection = ml_collections.ConfigDict(
    {
      "quantile": 0.98,
      "min_value": 0.5,
      "min_area": 20,
      "max_boxes": 3,
      "nms_iou": 0.5,
      "smooth_sigma": 2.0,
      "patch_normalization": False,
      "iou_thresholds": (0.1, 0.25, 0.5),
      # Detection metrics in the periodic evaluations too, over at most max_examples positive
      # examples with boxes (0 = all); the report of python -m mammojax.evaluate scores all.
      "in_periodic_eval": True,
      "max_examples": 64,
    }
  )
  c.optim.update(learning_rate=1e-3, warmup_steps=30, weight_decay=1e-4)
  c.checkpoint.update(every_steps=200, best_metric="eval/auc", best_mode="max")
  c.logging.every_steps = 20

  if variant == "smoke":
    c.data.update(image_size=(64, 48), patch_size=32)
    c.data.synthetic.update(num_train=16, num_val=8, num_test=8, mass_fraction=0.5)
    c.data.synthetic.update(mass_radius=(3.0, 5.0), calc_cluster_radius=4.0)
    c.model.backbone.update(width=0.1, depth=0.1)
    c.model.backbone_trainable = False  # the frozen-encoder path (and a faster compile)
    c.model.fpn.features = 8
    c.model.head.update(encoder_features=8, attention_hidden=8)
    fragments.apply_smoke(c, 2)
    c.eval.num_overlays = 2
    c.eval.detection.min_area = 2
  elif variant == "offline":
    c.name = "fpn_mil_offline"
    c.data.mode = "offline"
    c.train.steps = 400
    c.optim.learning_rate = 1e-3
  elif variant in ("calc", "mass"):
    c.name = f"fpn_mil_{variant}"
    c.data.update(image_size=(1520, 912), patch_size=512, channels=3, thumbnail_stride=4)
    c.model.backbone = ml_collections.ConfigDict(
      {
        "width": 1.1,
        "depth": 1.2,
        "static_padding_size": (260, 260),
        "drop_connect_rate": 0.2,
        "batch_norm_momentum": 0.99,
      }
    )
    c.model.backbone_trainable = False
    c.model.fpn.features = 256
    c.model.head.update(encoder_features=256, encoder_dropout=0.25, attention_dropout=0.25)
    c.model.head.attention_hidden = 128
    c.loss.pos_weight_from_data = False
    c.train.batch_size = 8
    c.train.steps = 30 * 1000  # 30 epochs of ~8k training images; set to your dataset's steps
    c.optim.update(learning_rate=5e-5, warmup_steps=0, schedule="constant")
    c.eval.update(batch_size=8, every_steps=1000)
    c.eval.detection.update({"min_area": 230, "smooth_sigma": 10.0, "patch_normalization": True})
    c.checkpoint.every_steps = 1000
    if variant == "calc":
      c.data.label = "Suspicious_Calcification"
      c.model.head.update(encoder_type="isab", layer_norm=True, pooling_type="pma")
      c.loss.pos_weight = VINDR_CALCIFICATION_POS_WEIGHT
    else:
      c.data.label = "Mass"
      c.model.head.update(encoder_type="mlp", pooling_type="gated-attention")
      c.loss.pos_weight = VINDR_MASS_POS_WEIGHT
  elif variant:
    raise fragments.unknown_variant(
      "configs/fpn_mil.py", variant, ("", "smoke", "calc", "mass", "offline")
    )
  return c
