"""Offline feature extraction: a frozen encoder over a dataset, once, to ArrayRecord.

FPN-MIL (the frozen encoder + FPN over every patch):

  python -m mammojax.extract_features --config=configs/fpn_mil.py --workdir=RUN --out=DIR
  python -m mammojax.main --config=configs/fpn_mil.py:offline --workdir=RUN2 \\
      --config.data.features_dir=DIR

Temporal-GradCam (the frozen backbone over every image of a sequence dataset; see
:mod:`mammojax.tasks.temporal_features`). The backbone comes from --workdir (a trained
``image_classifier`` or end-to-end run) or from ``model.backbone_checkpoint`` (e.g. converted
ImageNet weights):

  python -m mammojax.extract_features --config=configs/temporal.py:paper,vit,dnn \\
      --config.data.dir=/data/oasis_seq --config.model.backbone_checkpoint=/w/vit --out=FEATS
  python -m mammojax.main --config=configs/temporal.py:paper,vit,dnn --workdir=RUN \\
      --config.data.dir=/data/oasis_seq --config.data.features_dir=FEATS

(``python -m mammojax.main`` with a temporal config also extracts them itself, into a cache
keyed by the data and the backbone's weights, when ``data.features_dir`` is empty.)

The encoder and FPN weights come from the training run in --workdir (its best checkpoint if it
tracked one, else its latest). Without --workdir the encoder is ``model.backbone_checkpoint``
(e.g. converted Mammo-CLIP weights) or, failing that, its initialisation, and the FPN keeps its
initialisation: useful only to test the plumbing.

Each record is one image: ``features_<s>`` [P, h_s, w_s, F] per scale of ``model.head.scales``
(P = every patch position; background ones masked), ``patch_mask`` [P], ``patch_coords`` [P, 2]
(row, col), ``labels`` [K], every ground-truth box (``boxes`` [max_boxes, 4], ``box_labels``,
``num_boxes``) and the ``thumbnail``. Shards are written atomically; the manifest, written
last, records the settings and a fingerprint, and a rerun with the same settings does nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from mammojax.console import run_program
from mammojax.data import records
from mammojax.data.pipelines import mil as mil_pipeline
from mammojax.tasks.fpn_mil import FPNMILTask, build_backbone, build_fpn
from mammojax.train.init_state import load_pretrained
from mammojax.train.variable_store import load_variables

log = logging.getLogger("mammojax")
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _replace(target: dict, loaded: dict, path: str, source: str) -> dict:
  """``loaded`` in place of ``target`` after checking that the tree paths and shapes match."""
  want = jax.tree_util.tree_structure(target)
  have = jax.tree_util.tree_structure(loaded)
  if want != have:
    raise ValueError(
      f"{source}: {path} does not fit the configured model (was it trained with "
      "the same model.backbone / model.fpn settings?)"
    )
  for a, b in zip(jax.tree.leaves(target), jax.tree.leaves(loaded)):
    if tuple(a.shape) != tuple(np.shape(b)):
      raise ValueError(
        f"{source}: {path} has a leaf of shape {np.shape(b)}, the model expects {tuple(a.shape)}"
      )
  return jax.tree.map(lambda b: jnp.asarray(b, jnp.float32), loaded)


def encoder_variables(
  task: FPNMILTask, example: dict[str, np.ndarray], workdir: str = ""
) -> dict[str, Any]:
  """``{'backbone': {'params', 'batch_stats'}, 'fpn': {'params'}}`` from ``workdir``, else from
  ``model.backbone_checkpoint`` / initialisation."""
  batch = {k: v[None] for k, v in example.items()}

  def init_fn(rng):
    return nn.meta.unbox(task.init_variables(rng, batch))

  # With a run to load, shapes suffice (no compile); otherwise the initial values are used.
  rng = jax.random.key(0)
  init = jax.eval_shape(init_fn, rng) if workdir else jax.jit(init_fn)(rng)
  backbone = {"params": init["params"]["backbone"], "batch_stats": init["batch_stats"]["backbone"]}
  fpn = {"params": init["params"]["fpn"]}
  if workdir:
    loaded = load_pretrained(workdir)
    for name, collections in (("backbone", ("params", "batch_stats")), ("fpn", ("params",))):
      for collection in collections:
        tree = loaded.get(collection, {}).get(name)
        if tree is None:
          raise ValueError(
            f"{workdir} has no {collection}/{name}: extract features from an "
            "online FPN-MIL run (data.features_dir empty)"
          )
        target = backbone if name == "backbone" else fpn
        target[collection] = _replace(target[collection], tree, f"{collection}/{name}", workdir)
  elif task.config.model.backbone_checkpoint:
    loaded = load_variables(task.config.model.backbone_checkpoint)
    for collection in ("params", "batch_stats"):
      backbone[collection] = _replace(
        backbone[collection], loaded[collection], collection, task.config.model.backbone_checkpoint
      )
  return {"backbone": backbone, "fpn": fpn}


def make_pyramid_fn(model: ml_collections.ConfigDict, scales: Sequence[int]):
  """jitted ``(variables, patches [B, P, S, S, C]) -> {s: [B, P, h_s, w_s, F]}`` (inference);
  one compiled function per model configuration in a process."""
  return _pyramid_fn(model.to_json(sort_keys=True), tuple(int(s) for s in scales))


@functools.lru_cache(maxsize=4)
def _pyramid_fn(model_json: str, scales: tuple[int, ...]):
  model = ml_collections.ConfigDict(json.loads(model_json))
  backbone, fpn = build_backbone(model), build_fpn(model)

  @jax.jit
  def pyramid(variables, patches):
    b, p = patches.shape[:2]
    maps = backbone.apply(
      variables["backbone"], patches.reshape((b * p,) + patches.shape[2:]), False
    )
    levels = fpn.apply(variables["fpn"], maps["stride_16"], maps["stride_32"])
    return {s: levels[s].reshape((b, p) + levels[s].shape[1:]) for s in scales}

  return pyramid


def _fingerprint(config: ml_collections.ConfigDict, workdir: str, source: str, dtype: str) -> str:
  body = json.dumps(
    {
      "data": config.data.to_dict(),
      "backbone": config.model.backbone.to_dict(),
      "fpn": config.model.fpn.to_dict(),
      "scales": list(config.model.head.scales),
      "backbone_checkpoint": config.model.backbone_checkpoint,
      "workdir": os.path.abspath(workdir) if workdir else "",
      "source": os.path.abspath(source),
      "dtype": dtype,
    },
    sort_keys=True,
    default=str,
  )
  return hashlib.sha256(body.encode()).hexdigest()[:16]


def extract_features(
  config: ml_collections.ConfigDict,
  out_dir: str,
  workdir: str = "",
  *,
  splits: Sequence[str] | None = None,
  batch_size: int = 8,
  examples_per_shard: int = 256,
  dtype: str = "float32",
) -> str:
  """Writes the per-scale features of every split (default: all of the image dataset's) to
  ``out_dir``; returns ``out_dir``."""
  if config.data.get("features_dir"):
    raise ValueError(
      "extract_features needs the online config (data.features_dir empty); it "
      "reads images, not features"
    )
  if dtype not in FEATURE_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
  task = FPNMILTask(config)
  source = task.image_dir()
  source_manifest = records.read_manifest(source)
  splits = list(splits or source_manifest["splits"])
  fingerprint = _fingerprint(config, workdir, source, dtype)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, records.MANIFEST)
  if os.path.exists(manifest_path):
    existing = records.read_manifest(out_dir)["config"]
    if existing.get("fingerprint") == fingerprint and set(splits) <= set(
      records.read_manifest(out_dir)["splits"]
    ):
      log.info("features in %s are up to date", out_dir)
      return out_dir
    os.remove(manifest_path)  # Stale: the directory is incomplete until the new manifest.

  scales = tuple(int(s) for s in config.model.head.scales)
  datasets = {
    split: mil_pipeline.patch_dataset(
      source, split, task.settings, config.data.label, filter_boxes=False
    )
    for split in splits
  }
  first = datasets[splits[0]][0]
  variables = encoder_variables(task, first, workdir)
  pyramid = make_pyramid_fn(config.model, scales)
  cast = FEATURE_DTYPES[dtype]
  split_entries = {}
  feature_dim = None
  for split in splits:
    examples = datasets[split]
    count = len(examples)
    num_shards = max(1, -(-count // examples_per_shard))
    names = []
    for shard, indices in enumerate(records.split_evenly(range(count), num_shards)):
      name = records.shard_name(split, shard, num_shards)
      shard_records = []
      for start in range(0, len(indices), batch_size):
        rows = [examples[int(i)] for i in indices[start : start + batch_size]]
        patches = np.stack([r["patches"] for r in rows])
        if len(rows) < batch_size:  # One compiled shape: pad the last batch.
          pad = np.repeat(patches[-1:], batch_size - len(rows), axis=0)
          patches = np.concatenate([patches, pad])
        levels = jax.device_get(pyramid(variables, jnp.asarray(patches)))
        for j, row in enumerate(rows):
          record = {f"features_{s}": np.asarray(levels[s][j], cast) for s in scales}
          record.update(
            {
              k: row[k]
              for k in (
                "patch_mask",
                "patch_coords",
                "labels",
                "boxes",
                "box_labels",
                "num_boxes",
                "thumbnail",
              )
            }
          )
          shard_records.append(record)
        feature_dim = int(levels[scales[0]].shape[-1])
      records.write_shard(os.path.join(out_dir, name), shard_records)
      names.append(name)
    split_entries[split] = {"shards": names, "count": count}
    log.info("extracted %d %s examples", count, split)
  settings = task.settings
  manifest_config = {
    "kind": "mil_features",
    "fingerprint": fingerprint,
    "scales": list(scales),
    "feature_dim": feature_dim,
    "dtype": dtype,
    "image_size": list(settings.image_size),
    "patch_size": settings.patch_size,
    "overlap": settings.overlap,
    "num_patches": settings.num_patches,
    "thumbnail_stride": settings.thumbnail_stride,
    "labels": list(source_manifest["config"].get("labels", [])),
    "source": source,
    "workdir": workdir,
    "backbone_checkpoint": config.model.backbone_checkpoint,
  }
  records.write_manifest(out_dir, split_entries, manifest_config)
  return out_dir


TEMPORAL_TASKS = ("temporal", "temporal_end_to_end", "image_classifier")


def extract_sequence_features(
  config: ml_collections.ConfigDict, out_dir: str, workdir: str = "", batch_size: int = 32
) -> str:
  """Per-image backbone features of a temporal config's sequence dataset into ``out_dir``."""
  from mammojax.tasks.temporal import ImageClassifierTask
  from mammojax.tasks.temporal_features import backbone_subtree, ensure_features

  source = workdir or config.model.backbone_checkpoint
  if not source:
    raise ValueError(
      "no backbone: pass --workdir=RUN (a trained image_classifier run) or "
      "--config.model.backbone_checkpoint=DIR (python -m mammojax.convert resnet|vit ...)"
    )
  variables = backbone_subtree(load_pretrained(source), source)
  image_dir = ImageClassifierTask(config).image_dir
  return ensure_features(image_dir, config.model.backbone, variables, out_dir, batch_size)


def define_flags() -> None:
  """CLI flags, defined only when run as a program (``mammojax.main`` owns --config in-process)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "The online FPN-MIL config (configs/fpn_mil.py[:variant]) or a temporal config "
    "(configs/temporal.py[:variant]); --config.x=y overrides.",
    lock_config=True,
  )
  flags.DEFINE_string(
    "workdir", "", "Training run whose encoder (+ FPN) weights to use (FPN-MIL or temporal)."
  )
  flags.DEFINE_string("out", None, "Output feature dataset directory.")
  flags.DEFINE_list("splits", [], "Splits to extract (default: all).")
  flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
  flags.DEFINE_enum("dtype", "float32", sorted(FEATURE_DTYPES), "Stored feature dtype.")
  flags.mark_flags_as_required(["config", "out"])


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if f.config.task in TEMPORAL_TASKS:
    out = extract_sequence_features(f.config, f.out, f.workdir, batch_size=f.batch_size)
  else:
    out = extract_features(
      f.config, f.out, f.workdir, splits=f.splits or None, batch_size=f.batch_size, dtype=f.dtype
    )
  print(json.dumps({"out": out, "splits": records.read_manifest(out)["splits"]}))


if __name__ == "__main__":
  run_program(main, define_flags)
