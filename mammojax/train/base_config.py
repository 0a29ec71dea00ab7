"""The config sections every experiment shares; ``configs/*.py`` start from ``base_config()``
and take what several of them share from :mod:`mammojax.train.config_fragments`.

Scripts may rely on these names: ``seed``, ``train.steps``, ``train.batch_size``, ``mesh``,
``eval.every_steps``.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "train"
  c.task = ""
  c.seed = 0
  # PRNG for init and dropout. 'rbg' compiles parameter initialisation several times faster
  # than 'threefry2x32' on XLA:CPU; both are deterministic given the seed.
  c.rng_impl = "rbg"
  # A converted checkpoint directory (python -m mammojax.convert) that initialises the model.
  c.init_from = ""

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 8
  c.train.compute_dtype = "float32"  # or "bfloat16" (float32 master weights)
  c.train.freeze = []  # regexes over '/'-joined param paths, e.g. ['registration/.*']

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 200
  c.eval.batch_size = 8
  c.eval.split = "val"
  c.eval.early_stopping_patience = 0  # evaluations without improvement; 0 = off

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "warmup_cosine"  # or "constant"
  c.optim.warmup_steps = 50
  c.optim.end_lr_factor = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.9
  c.optim.clip_grad_norm = 1.0  # 0 = off
  c.optim.plateau = ml_collections.ConfigDict()
  c.optim.plateau.enabled = False
  c.optim.plateau.factor = 0.5
  c.optim.plateau.patience = 5
  c.optim.plateau.cooldown = 0
  c.optim.plateau.accumulation_steps = 100
  c.optim.plateau.rtol = 1e-4

  # Devices are arranged as a mesh; -1 takes all remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data", "fsdp", "model")
  c.mesh.shape = (-1, 1, 1)
  # Logical parameter axes (nn.with_logical_partitioning) -> mesh axes.
  c.sharding_rules = [
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
  ]

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.best_metric = ""  # e.g. "eval/c_index"; empty = no best-checkpoint tracking
  c.checkpoint.best_mode = "max"

  c.logging = ml_collections.ConfigDict()
  c.logging.every_steps = 50
  c.logging.tensorboard = True

  c.data = ml_collections.ConfigDict()
  c.data.workers = 0  # Grain multiprocessing workers; 0 = read in the main process
  return c
