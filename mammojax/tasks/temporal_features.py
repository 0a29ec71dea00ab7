"""Per-image features of a frozen backbone, computed once into records, for the temporal models.

Temporal-GradCam's frozen-feature route: every image of a sequence dataset (ingested with
``mammojax.ingest --task=sequence`` or the embedded synthetic cohort) goes through the backbone
once; the temporal models then train on ``[seq_len, D]`` feature sequences in milliseconds per
step, and every model and seed of a sweep shares the same features.

The feature dataset mirrors its source: the same splits, shards and record order, with
``features`` float32 ``[T, D]`` (one row per image of the record, oldest first) in place of
``images``, and ``time_offsets``, ``image_labels``, ``label``, ``length``, ``patient_hash``
copied. Its manifest records a fingerprint of the source dataset, the backbone's fields and a
hash of its weights; a directory with a matching fingerprint is reused, so a rerun (or the next
arm of a sweep) does no work. Shards are written atomically and the manifest last.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mammojax.data import records
from mammojax.data.constants import default_data_root
from mammojax.models import backbones
from mammojax.models.sequence_classifier import ImageEncoder

log = logging.getLogger("mammojax")
COPIED_FIELDS = ("time_offsets", "image_labels", "label", "length", "patient_hash")
FEATURES_KIND = "sequence_features"


def backbone_subtree(loaded: Mapping[str, Any], source: str) -> dict[str, Any]:
  """``{'params': ..., ['batch_stats': ...]}`` of the backbone alone from ``loaded`` variables:
  a classifier run's (under ``backbone/``) or a converted backbone (at the root; an ImageNet
  classifier head ``fc`` / ``head`` is dropped)."""
  params = loaded.get("params", {})
  out = {}
  if "backbone" in params:
    for collection, tree in loaded.items():
      if "backbone" in tree:
        out[collection] = tree["backbone"]
    return out
  if not params:
    raise ValueError(f"{source} holds no params")
  for collection, tree in loaded.items():
    out[collection] = {k: v for k, v in tree.items() if k not in ("fc", "head")}
  return out


def extraction_fingerprint(
  source_dir: str, backbone: Mapping[str, Any], variables: Mapping[str, Any], pixel_norm
) -> str:
  """Hash of what the features depend on: the source data, the backbone and its weights."""
  h = hashlib.sha256()
  manifest = records.read_manifest(source_dir)
  h.update(json.dumps(manifest, sort_keys=True, default=str).encode())
  h.update(json.dumps(dict(backbone), sort_keys=True, default=str).encode())
  h.update(json.dumps([float(v) for v in pixel_norm]).encode())
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda item: str(item[0])
  ):
    h.update(str(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()[:16]


def ensure_features(
  source_dir: str,
  backbone: ml_collections.ConfigDict | Mapping[str, Any],
  variables: Mapping[str, Any],
  out_dir: str = "",
  batch_size: int = 32,
) -> str:
  """The feature dataset of ``source_dir`` under ``backbone`` with ``variables``, written now
  unless an up-to-date one exists. Returns its directory.

  Args:
    source_dir: a sequence dataset (records with ``images`` [T, H, W] uint16).
    backbone: ``model.backbone`` fields (:func:`mammojax.models.backbones.build_backbone`, plus
      ``input_scaling``, ``imagenet_normalize``, ``input_size``).
    variables: the backbone's ``{'params', 'batch_stats'}`` (see :func:`backbone_subtree`).
    out_dir: where to write; empty = ``<data root>/temporal_features/<fingerprint>``.
    batch_size: images per forward pass (one compiled shape; the last batch is padded).
  """
  fields = backbone.to_dict() if isinstance(backbone, ml_collections.ConfigDict) else dict(backbone)
  manifest = records.read_manifest(source_dir)
  config = manifest["config"]
  if "features" in config.get("fields", []) or config.get("kind") == FEATURES_KIND:
    raise ValueError(f"{source_dir} already holds features; point data.dir at an image dataset")
  pixel_norm = backbones.pipeline_normalisation(
    fields.get("input_scaling", "standardize"),
    config.get("pixel_mean", 0.0),
    config.get("pixel_std", 1.0),
  )
  fingerprint = extraction_fingerprint(source_dir, fields, variables, pixel_norm)
  out_dir = out_dir or os.path.join(default_data_root(), "temporal_features", fingerprint)
  if _up_to_date(out_dir, fingerprint):
    log.info("features in %s are up to date", out_dir)
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  stale = os.path.join(out_dir, records.MANIFEST)
  if os.path.exists(stale):
    os.remove(stale)  # The directory is incomplete until the new manifest is written.
  encode = _encoder(json.dumps(fields, sort_keys=True, default=str))
  variables = {c: {"backbone": jax.tree.map(jnp.asarray, t)} for c, t in variables.items()}
  split_entries, feature_dim = {}, 0
  for split, entry in manifest["splits"].items():
    for name in entry["shards"]:
      source = grain.sources.ArrayRecordDataSource([os.path.join(source_dir, name)])
      examples = [records.decode_example(source[i]) for i in range(len(source))]
      features = _features_of(examples, encode, variables, pixel_norm, batch_size)
      feature_dim = int(features[0].shape[-1]) if features else feature_dim
      rows = [
        {"features": f, **{k: e[k] for k in COPIED_FIELDS if k in e}}
        for e, f in zip(examples, features)
      ]
      records.write_shard(os.path.join(out_dir, name), rows)
    split_entries[split] = dict(entry)
    log.info("extracted features of %d %s records", entry.get("count", 0), split)
  records.write_manifest(
    out_dir,
    split_entries,
    {
      "kind": FEATURES_KIND,
      "fingerprint": fingerprint,
      "feature_dim": feature_dim,
      "source": os.path.abspath(source_dir),
      "source_kind": config.get("kind", config.get("task", "")),
      "backbone": fields,
    },
  )
  return out_dir


def _up_to_date(out_dir: str, fingerprint: str) -> bool:
  if not os.path.exists(os.path.join(out_dir, records.MANIFEST)):
    return False
  return records.read_manifest(out_dir)["config"].get("fingerprint") == fingerprint


@functools.lru_cache(maxsize=4)
def _encoder(fields_json: str):
  """jitted ``(variables, images [N, H, W, 1]) -> features [N, D]``, one per backbone config."""
  module = ImageEncoder(json.loads(fields_json))
  return jax.jit(lambda variables, images: module.apply(variables, images))


def _features_of(examples, encode, variables, pixel_norm, batch_size) -> list[np.ndarray]:
  """``[T_i, D]`` float32 features of every record's images, in batches of ``batch_size``."""
  mean, std = pixel_norm
  images = [np.asarray(e["images"]) for e in examples]
  if not images:
    return []
  flat = np.concatenate(images).astype(np.float32)
  flat = ((flat - mean) / std)[..., None]
  out = []
  for start in range(0, len(flat), batch_size):
    chunk = flat[start : start + batch_size]
    count = len(chunk)
    if count < batch_size:  # One compiled shape: pad the last batch.
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - count, axis=0)])
    out.append(np.asarray(jax.device_get(encode(variables, jnp.asarray(chunk))))[:count])
  features = np.concatenate(out).astype(np.float32)
  bounds = np.cumsum([0] + [len(i) for i in images])
  return [features[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
