r"""Temporal-GradCam: classify each image from it and the same patient's earlier images.

A frozen image backbone (ResNet or ViT) turns every image into a feature vector; a temporal
model reads the newest ``data.seq_len`` of a patient's vectors (padded and masked) and gives two
class logits. Default: the embedded synthetic brain-MRI cohort (disease enlarges the ventricles
over visits, so one image is ambiguous and the sequence is not), a ResNet-18 first trained on a
separate synthetic pretraining cohort (stands in for ImageNet weights: ``config.pretrain``
trains it into WORKDIR/backbone_resnet unless --config.model.backbone_checkpoint names one),
features extracted once, then a GRU over the newest 3 visits and their time gaps (the reference's
DNN is ``:dnn``; benchmarks/RESULTS.md compares them):

  python -m mammojax.main --config=configs/temporal.py --workdir=/tmp/temporal

Variants: comma-separated tokens, ``--config=configs/temporal.py:vit,gru``.

  backbone   resnet (default) | vit
  model      image (linear head on the current image's features, seq_len 1: the seed's
             "ResNet"/"ViT" rows) | dnn (the reference's "seq 3" model; default with paper) |
             gru (default) | transformer (both see the time gaps between visits)
  route      end_to_end: features computed inside the step (the backbone can train with
             --config.model.backbone_trainable=all; attribution reaches every image's pixels)
  pretrain   the backbone pretraining run itself (image_classifier on the pretraining cohort)
  smoke      seconds on a CPU; what the tests run
  paper      the seed's settings for real OASIS-style data: ResNet-18 at 256x256 on raw [0, 1]
             intensities, ViT-B/16 at 224x224 on 8-bit quantised ones (as the reference feeds
             them), converted ImageNet weights, batch 8, Adam 1e-3, seq_len 3:
               python -m mammojax.convert resnet resnet18_imagenet.pt --out=/w/r18
               python -m mammojax.ingest --task=sequence --csv=oasis.csv --images=ROOT \
                 --out=/data/oasis_seq --split=train=0.6,val=0.2,test=0.2 \
                 --label_scope=patient --intensity=unit
               python -m mammojax.main --config=configs/temporal.py:paper,resnet,dnn \
                 --workdir=DIR --config.data.dir=/data/oasis_seq \
                 --config.model.backbone_checkpoint=/w/r18

The seed's table (five seeds, six models, mean +- std) in one command:

  python -m mammojax.sweep --workdir=/tmp/temporal_sweep

Where the reference's README and code disagree, the default follows the README and the code's
value is an option:

  data.padding              'start' (README: "padded at the beginning", newest image last) |
                            'end' (the code's collate: images first, zeros after). Masked
                            either way; the DNN, like the reference, ignores the mask.
  model.temporal.dropout_rate   0.1 (README) | 0.01 (code)
  eval.early_stopping_patience  5 (README) | 10 (code), in evaluations (one per epoch)
  train.steps               25 epochs (README) | 100 epochs (code)

The reference has no validation split (early stopping, its learning-rate schedule and the
checkpoint choice all read the test set). Here a patient-level validation split drives all
three and test is reported once, by ``mammojax.evaluate`` or the sweep. Its AUC is computed on
the raw class-1 logit and its loss is a sum of batch means; we report AUC on probabilities and
the mean loss (the AUC ranking is the same). Its learning-rate plateau reads the test loss; ours
(``optim.plateau``) reads the training loss, averaged over an epoch's steps.
"""

import os

import ml_collections

from mammojax.train import config_fragments as fragments
from mammojax.train.base_config import base_config

BACKBONES = ("resnet", "vit")
MODELS = ("image", "dnn", "gru", "transformer")
OPTIONS = ("end_to_end", "pretrain", "smoke", "paper")
# Synthetic cohort: 320 patients, ~850 images, ~510 training examples; batch 8 -> ~64 steps.
EPOCH_STEPS = 64


def backbone_fields(kind: str, size: str) -> ml_collections.ConfigDict:
  """``model.backbone``: ``size`` is 'synthetic' (CPU minutes at 64x64), 'paper' (the
  reference's ResNet-18 / ViT-B/16) or 'smoke'."""
  if kind == "resnet":
    fields = {"kind": "resnet", "depth": 18, "base_width": {"paper": 64, "smoke": 8}.get(size, 32)}
    fields.update(input_scaling="unit" if size == "paper" else "standardize", input_size=0)
  else:
    vit = {
      "paper": dict(patch_size=16, hidden_dim=768, depth=12, num_heads=12, mlp_dim=3072),
      "synthetic": dict(patch_size=8, hidden_dim=192, depth=4, num_heads=3, mlp_dim=768),
      "smoke": dict(patch_size=8, hidden_dim=32, depth=2, num_heads=2, mlp_dim=64),
    }[size]
    image_size = {"paper": 224, "synthetic": 64, "smoke": 16}[size]
    fields = {"kind": "vit", **vit, "image_size": image_size}
    fields.update(
      input_scaling="unit_quantized" if size == "paper" else "standardize",
      input_size=image_size if size == "paper" else 0,
    )
  fields["imagenet_normalize"] = False  # the reference feeds ImageNet weights unnormalised
  return ml_collections.ConfigDict(fields)


def temporal_fields(kind: str) -> ml_collections.ConfigDict:
  """``model.temporal`` of each temporal model (:mod:`mammojax.models.temporal`)."""
  return ml_collections.ConfigDict(
    {
      "image": {"kind": "image"},
      "dnn": {"kind": "dnn", "hidden_dim": 64, "num_layers": 1, "dropout_rate": 0.1},
      "gru": {
        "kind": "gru",
        "hidden_dim": 64,
        "time_dim": 16,
        "max_time": 10.0,
        "dropout_rate": 0.1,
      },
      "transformer": {
        "kind": "transformer",
        "model_dim": 64,
        "num_layers": 2,
        "num_heads": 4,
        "mlp_dim": 128,
        "max_time": 10.0,
        "dropout_rate": 0.1,
      },
    }[kind]
  )


def _tokens(variant: str) -> tuple[str, str, set[str]]:
  tokens = [t for t in variant.split(",") if t]
  unknown = [t for t in tokens if t not in BACKBONES + MODELS + OPTIONS]
  if unknown:
    raise fragments.unknown_variant("configs/temporal.py", unknown[0], BACKBONES + MODELS + OPTIONS)
  backbone = [t for t in tokens if t in BACKBONES] or ["resnet"]
  # Default: the GRU, which sees the time gaps (on the synthetic cohort it finds the change the
  # reference's DNN misses); with `paper`, the reference's DNN.
  model = [t for t in tokens if t in MODELS] or ["dnn" if "paper" in tokens else "gru"]
  if len(backbone) > 1 or len(model) > 1:
    raise ValueError(
      f"configs/temporal.py:{variant} names more than one backbone or model; pick one of "
      f"{BACKBONES} and one of {MODELS}"
    )
  return backbone[0], model[0], {t for t in tokens if t in OPTIONS}


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  backbone, model, options = _tokens(variant)
  size = "paper" if "paper" in options else "smoke" if "smoke" in options else "synthetic"
  c = base_config()
  c.name = f"temporal_{backbone}_{model}"
  c.task = "temporal_end_to_end" if "end_to_end" in options else "temporal"

  # data.dir: a sequence dataset (python -m mammojax.ingest --task=sequence); empty = synthetic.
  c.data.dir = ""
  c.data.synthetic = ml_collections.ConfigDict(
    {"root": "", "image_size": (64, 64), "num_patients": 320, "seed": 0}
  )
  c.data.source = "cohort"  # image_classifier: 'cohort' | 'pretrain' (the pretraining cohort)
  c.data.seq_len = 1 if model == "image" else 3
  c.data.padding = "start"
  # -1: the split stored in the dataset; else a patient-level split stratified by label, drawn
  # from this seed (python -m mammojax.sweep sets it to each run's seed).
  c.data.split_seed = -1
  c.data.fractions = (("train", 0.6), ("val", 0.2), ("test", 0.2))
  c.data.features_dir = ""  # empty: <data root>/temporal_features/<fingerprint>

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 2
  c.model.backbone = backbone_fields(backbone, size)
  c.model.backbone_trainable = "none"  # 'none' | 'last_stage' | 'all'
  # A converted backbone (python -m mammojax.convert resnet|vit ...) or an image_classifier run.
  # Empty: python -m mammojax.main first trains the :pretrain variant into WORKDIR/backbone_<kind>.
  c.model.backbone_checkpoint = ""
  c.model.temporal = temporal_fields(model)
  c.pretrain = ml_collections.ConfigDict()
  pretrain_variant = ",".join([backbone, "pretrain"] + (["smoke"] if size == "smoke" else []))
  c.pretrain[f"backbone_{backbone}"] = ml_collections.ConfigDict(
    {
      "config": os.path.abspath(__file__),
      "variant": pretrain_variant,
      "link": "model.backbone_checkpoint",
    }
  )

  # The reference: Adam 1e-3, batch 8, cross-entropy, best checkpoint and early stopping on the
  # (here: validation) loss, one evaluation per epoch, 25 epochs.
  c.train.update(steps=25 * EPOCH_STEPS, batch_size=8)
  c.eval.update(batch_size=32, every_steps=EPOCH_STEPS, early_stopping_patience=5)
  c.optim.update(name="adam", learning_rate=1e-3, schedule="constant", warmup_steps=0)
  c.optim.update(weight_decay=0.0, clip_grad_norm=0.0)
  # ReduceLROnPlateau(patience=3, factor=0.1) once per epoch, on the training loss.
  c.optim.plateau.update(enabled=True, factor=0.1, patience=3, accumulation_steps=EPOCH_STEPS)
  c.checkpoint.update(every_steps=EPOCH_STEPS, best_metric="eval/loss", best_mode="min", keep=2)
  c.logging.every_steps = EPOCH_STEPS

  if "pretrain" in options:
    # The backbone on the pretraining cohort: 8 ventricle-size bins, trained from scratch.
    del c.pretrain[f"backbone_{backbone}"]
    c.name = f"temporal_pretrain_{backbone}"
    c.task = "image_classifier"
    c.data.source = "pretrain"
    c.data.seq_len = 1
    c.model.num_classes = 8  # SyntheticBrainSpec.pretrain_classes
    c.model.backbone_trainable = "all"
    c.model.temporal = temporal_fields("image")
    c.train.update(steps=400, batch_size=32)
    c.eval.update(every_steps=100, early_stopping_patience=0)
    c.optim.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4, clip_grad_norm=1.0)
    c.optim.update(schedule="warmup_cosine", warmup_steps=20)
    c.optim.plateau.enabled = False
    c.checkpoint.update(every_steps=100, best_metric="eval/accuracy", best_mode="max")
    c.logging.every_steps = 20
  if size == "smoke":
    c.data.synthetic.update(image_size=(16, 16), num_patients=24)
    fragments.apply_smoke(c, 3, warmup_steps=None)
    c.eval.early_stopping_patience = 0
    c.optim.plateau.accumulation_steps = 1
    if model in ("gru", "transformer"):
      c.model.temporal.update(hidden_dim=8) if model == "gru" else c.model.temporal.update(
        model_dim=8, mlp_dim=16, num_heads=2
      )
  elif size == "paper":
    for name in list(c.pretrain):
      del c.pretrain[name]  # real data: bring converted ImageNet weights
    # ~77 training images at batch 8: ~10 steps per epoch; set to your dataset's.
    steps_per_epoch = 10
    c.train.update(steps=25 * steps_per_epoch, batch_size=8)
    c.eval.update(every_steps=steps_per_epoch, batch_size=8)
    c.optim.plateau.accumulation_steps = steps_per_epoch
    c.checkpoint.every_steps = steps_per_epoch
    c.logging.every_steps = steps_per_epoch
  return c
