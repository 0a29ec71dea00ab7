"""Import of Mammo-CLIP EfficientNet encoders and trained FPN-MIL models into Flax variables.

* Mammo-CLIP checkpoints (``b2-model-best-epoch-10.tar``) are ``torch.save`` dicts whose 'model'
  state dict holds the image encoder under ``image_encoder.`` in efficientnet_pytorch's layout
  (``_conv_stem``, ``_bn0``, ``_blocks.{i}._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` /
  ``_bn1`` / ``_se_reduce`` / ``_se_expand`` / ``_project_conv`` / ``_bn2``, ``_conv_head``,
  ``_bn1``), next to the text encoder (``text_encoder.``), the projection heads
  (``image_projection.``, ``text_projection.``: Mammo-CLIP's ``LinearProjectionHead`` or
  ``MLPProjectionHead``) and ``logit_scale``. `import_mammoclip` converts the image encoder
  (optionally with its 1x1 head and the image projection) and lists every dropped key prefix.
* FPN-MIL checkpoints are ``{'model': state_dict, 'epoch': ..., ...}`` of the reference's
  ``PyramidalMILmodel``: ``inst_encoder.backbone.*`` (online models only), ``inst_encoder.
  inner_blocks.inner_block_{i}.{0,1}.*`` / ``layer_blocks.layer_block_{i}.{0,1}.*`` (FPN, ``.1``
  being the shared GroupNorm), ``side_inst_aggregator.encoders.encoder_{s}.*`` and
  ``.aggregators.aggregator_{s}.*``, ``side_classifiers.classifier_{s}.head_classifier.*``,
  ``scale_aggregator.*`` and ``classifier.head_classifier.*``.

Importers take ``{name: array}`` dicts (numpy arrays or torch tensors; see
`mammojax.convert.torch_files.unwrap_state_dict`) and never import torch; read checkpoint files
with `mammojax.convert.torch_files.load_torch_state_dict` (torch needed), as
``python -m mammojax.convert`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mammojax.convert import layouts
from mammojax.convert.mammoclip_projection import (
  MAMMOCLIP_PROJECTION_NAME,
  MAMMOCLIP_PROJECTION_PREFIX,
  import_image_projection,
)
from mammojax.convert.torch_files import raise_if_mismatched, select_prefix, unwrap_state_dict
from mammojax.models.mil.fpn_mil import FPNMIL
from mammojax.nn.efficientnet import MAMMOCLIP_STATIC_SIZE, EfficientNet

MAMMOCLIP_PREFIX = "image_encoder."
FPN_MIL_BACKBONE_PREFIX = "inst_encoder.backbone."
_LEAF_NAMES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
# Buffers torch keeps that have no Flax counterpart.
_IGNORED_SUFFIXES = ("num_batches_tracked",)

KeyFn = Callable[[tuple[str, ...]], str]


def mammoclip_encoder(include_head: bool = False) -> EfficientNet:
  """The EfficientNet-B2 that reproduces Mammo-CLIP's encoder (static padding for 260x260)."""
  return EfficientNet(static_padding_size=MAMMOCLIP_STATIC_SIZE, include_head=include_head)


def _leaf(name: str) -> str:
  return _LEAF_NAMES.get(name, name)


def _efficientnet_key(path: tuple[str, ...]) -> str:
  parts = []
  for name in path[:-1]:
    parts.append(name.replace("blocks_", "_blocks.") if name.startswith("blocks_") else "_" + name)
  return ".".join(parts + [_leaf(path[-1])])


def _fpn_key(path: tuple[str, ...]) -> str:
  module, leaf = path[0], _leaf(path[-1])
  if module == "norm":  # One GroupNorm shared by all four convs; read the copy after the first.
    return f"inner_blocks.inner_block_0.1.{leaf}"
  group = "inner_blocks" if module.startswith("inner_block_") else "layer_blocks"
  return f"{group}.{module}.0.{leaf}"


def _attention_pool_key(path: tuple[str, ...], gated: bool) -> str:
  """Keys of the reference's Gated_Attn_Net / Attn_Net (nn.Sequential indices)."""
  if path[0] == "pma":  # PoolingByMultiheadAttention: its seed 'S' and its 'mab'.
    return ".".join(list(path[1:-1]) + [_leaf(path[-1])])
  module, leaf = path[0], _leaf(path[-1])
  if gated:
    return {
      "attention_V": f"attention_V.0.{leaf}",
      "attention_U": f"attention_U.0.{leaf}",
      "attention_weights": f"attention_weights.{leaf}",
    }[module]
  return {"attention_V": f"module.0.{leaf}", "attention_weights": f"module.3.{leaf}"}[module]


def _head_key(path: tuple[str, ...], pooling_gated: bool, scale_gated: bool) -> str:
  module, rest = path[0], path[1:]
  if module.startswith("encoder_"):
    base = f"side_inst_aggregator.encoders.{module}"
    if rest[0] == "fc":  # MLP encoder: ModuleList([Sequential(Linear, ReLU, Dropout)]).
      return f"{base}.0.0.{_leaf(rest[-1])}"
    block = rest[0].replace("blocks_", "")
    return ".".join([base, block] + list(rest[1:-1]) + [_leaf(rest[-1])])
  if module.startswith("aggregator_"):
    return f"side_inst_aggregator.aggregators.{module}." + _attention_pool_key(rest, pooling_gated)
  if module.startswith("side_classifier_"):
    scale = module[len("side_classifier_") :]
    return f"side_classifiers.classifier_{scale}.head_classifier.{_leaf(rest[-1])}"
  if module == "classifier":
    return f"classifier.head_classifier.{_leaf(rest[-1])}"
  if module == "scale_aggregator":
    return "scale_aggregator." + _attention_pool_key(rest, scale_gated)
  raise ValueError(f"no FPN-MIL key for Flax path {path}")


def _to_flax(
  key: str, value: np.ndarray, shape: tuple[int, ...], is_kernel: bool, mismatched: list[str]
) -> np.ndarray | None:
  if is_kernel and len(shape) == 4:
    torch_shape = layouts.torch_conv_kernel_shape(shape)
    convert = layouts.torch_conv_kernel
  elif is_kernel and len(shape) == 2:
    torch_shape = layouts.torch_dense_kernel_shape(shape)
    convert = layouts.torch_dense_kernel
  else:
    torch_shape = tuple(shape)
    convert = lambda w: w
  if value.shape != torch_shape:
    mismatched.append(f"{key}: checkpoint {value.shape}, model expects {torch_shape}")
    return None
  return np.ascontiguousarray(convert(value)).astype(np.float32)


def _fill(
  abstract: Mapping[str, Any],
  state: Mapping[str, np.ndarray],
  key_fn: KeyFn,
  used: set[str],
  missing: list[str],
  mismatched: list[str],
  only: Callable[[tuple[str, ...]], bool] = lambda path: True,
) -> dict[str, Any]:
  """Reads every leaf of the abstract variables (collections 'params', 'batch_stats')."""
  out: dict[str, Any] = {}
  for collection, tree in abstract.items():
    flat = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
      if not only(path):
        continue
      key = key_fn(path)
      if key not in state:
        missing.append(key)
        continue
      used.add(key)
      value = _to_flax(key, np.asarray(state[key]), leaf.shape, path[-1] == "kernel", mismatched)
      if value is not None:
        flat[path] = value
    if flat:
      out[collection] = traverse_util.unflatten_dict(flat)
  return out


def _abstract_variables(model: nn.Module, *args: Any) -> dict[str, Any]:
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
  return nn.meta.unbox(dict(abstract))


def import_efficientnet(
  state_dict: Mapping[str, Any], model: EfficientNet | None = None, prefix: str = MAMMOCLIP_PREFIX
) -> dict[str, Any]:
  """Converts an efficientnet_pytorch-layout encoder to ``{'params', 'batch_stats'}``.

  Args:
    state_dict: a Mammo-CLIP checkpoint's state dict (or the loaded checkpoint; 'model' nesting
      and ``module.`` prefixes are removed); entries outside ``prefix`` are ignored.
    model: the Flax encoder the variables are for (default `mammoclip_encoder()`). Its
      ``include_head`` decides whether ``_conv_head`` / ``_bn1`` are read or skipped.
    prefix: key prefix of the encoder ('' for a bare efficientnet_pytorch state dict).

  Returns:
    Flax variables of float32 numpy arrays.

  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch.
  """
  variables, _ = _import_efficientnet(unwrap_state_dict(state_dict), model, prefix)
  return variables


def _import_efficientnet(
  state: Mapping[str, np.ndarray], model: EfficientNet | None, prefix: str
) -> tuple[dict[str, Any], set[str]]:
  """`import_efficientnet` on an unwrapped state dict; also returns the keys it read (with
  ``prefix``)."""
  model = model or mammoclip_encoder()
  state = select_prefix(state, prefix)
  if not state:
    raise ValueError(
      f'no encoder weights under prefix {prefix!r}; pass prefix="" for a bare '
      "EfficientNet state dict."
    )
  abstract = _abstract_variables(model, jnp.zeros((1, 64, 64, 3)))
  used: set[str] = set()
  missing: list[str] = []
  mismatched: list[str] = []
  variables = _fill(abstract, state, _efficientnet_key, used, missing, mismatched)
  skippable = ("_conv_head.", "_bn1.", "_fc.") if not model.include_head else ("_fc.",)
  unexpected = sorted(k for k in set(state) - used if not k.startswith(skippable))
  raise_if_mismatched(
    "EfficientNet checkpoint",
    missing,
    unexpected,
    mismatched,
    "Check width/depth (B2: 1.1 / 1.2) and the key prefix.",
  )
  return variables, {prefix + k for k in used}


def import_mammoclip(
  state_dict: Mapping[str, Any], include_head: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts a Mammo-CLIP checkpoint's image encoder and says what it leaves out.

  Args:
    state_dict: the checkpoint (``{'model': ...}`` or the bare state dict).
    include_head: also keep the encoder's 1x1 head (``_conv_head``, ``_bn1``: the variables of
      ``mammoclip_encoder(include_head=True)``) and the image projection head, stored as extra
      parameters under ``params['image_projection']`` (no Flax module holds them; Flax ignores
      them when applying the EfficientNet, `mammoclip_image_embedding` applies them). Such
      variables do not fit a model whose EfficientNet has no head (e.g. FPN-MIL's backbone).

  Returns:
    ``(variables, details)``: the Flax variables and ``details``:

    * ``'include_head'``: the argument;
    * ``'image_projection'``: `import_image_projection`'s description, or None (without
      ``include_head``, or a checkpoint without projection head);
    * ``'dropped'``: `dropped_prefixes` of every key not converted (``text_encoder.``,
      ``text_projection.``, ``logit_scale``; without ``include_head`` also
      ``image_projection.``, ``image_encoder._conv_head.`` and ``image_encoder._bn1.``).
      BatchNorm's ``num_batches_tracked`` counters are never converted and not listed.

  Raises:
    ValueError: naming missing, unexpected or mis-shaped keys of the encoder or the projection.
  """
  state = unwrap_state_dict(state_dict)
  model = mammoclip_encoder(include_head=include_head)
  variables, used = _import_efficientnet(state, model, MAMMOCLIP_PREFIX)
  description = None
  if include_head and any(k.startswith(MAMMOCLIP_PROJECTION_PREFIX) for k in state):
    embedding_dim = int(variables["params"]["conv_head"]["kernel"].shape[-1])
    projection, description = import_image_projection(state, embedding_dim)
    variables["params"][MAMMOCLIP_PROJECTION_NAME] = projection
    used |= {k for k in state if k.startswith(MAMMOCLIP_PROJECTION_PREFIX)}
  dropped = dropped_prefixes(
    {k: v for k, v in state.items() if k not in used and not k.endswith(_IGNORED_SUFFIXES)}
  )
  return variables, {
    "include_head": include_head,
    "image_projection": description,
    "dropped": dropped,
  }


def dropped_prefixes(state: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Groups the keys of ``state`` by prefix: the first name (``text_encoder.``), or under
  ``image_encoder.`` its first two (``image_encoder._conv_head.``); a key without a dot
  (``logit_scale``) is its own group.

  Returns:
    ``[{'prefix': str, 'tensors': int, 'parameters': int}, ...]`` (parameters: elements summed
    over the group's tensors), most parameters first.
  """
  groups: dict[str, list[int]] = {}
  for key, value in state.items():
    parts = key.split(".")
    depth = 2 if key.startswith(MAMMOCLIP_PREFIX) else 1
    prefix = ".".join(parts[:depth]) + "." if len(parts) > depth else key
    counts = groups.setdefault(prefix, [0, 0])
    counts[0] += 1
    counts[1] += int(np.prod(np.shape(value)))
  return [
    {"prefix": prefix, "tensors": tensors, "parameters": parameters}
    for prefix, (tensors, parameters) in sorted(groups.items(), key=lambda g: (-g[1][1], g[0]))
  ]


def _example_inputs(model: FPNMIL, state: Mapping[str, np.ndarray]) -> Any:
  if model.backbone is not None:
    return jnp.zeros((1, 1, 64, 64, 3))
  if model.fpn is not None:
    channels = []
    for i in (0, 1):
      key = f"inst_encoder.inner_blocks.inner_block_{i}.0.weight"
      if key not in state:
        raise ValueError(f"FPN-MIL checkpoint lacks {key}, needed for the FPN input channels.")
      channels.append(state[key].shape[1])
    return {
      "stride_16": jnp.zeros((1, 1, 4, 4, channels[0])),
      "stride_32": jnp.zeros((1, 1, 2, 2, channels[1])),
    }
  head = model.head
  first = {"mlp": "0.0.weight", "sab": "0.mab.fc_k.weight", "isab": "0.mab0.fc_k.weight"}
  key = f"side_inst_aggregator.encoders.encoder_{head.scales[0]}.{first.get(head.encoder_type, '')}"
  if key not in state:
    raise ValueError(
      f"FPN-MIL checkpoint lacks {key}, needed for the instance width; is "
      f"encoder_type={head.encoder_type!r} right?"
    )
  width = state[key].shape[1]
  return {s: jnp.zeros((1, 4, width)) for s in head.scales}


def import_fpn_mil(
  state_dict: Mapping[str, Any], model: FPNMIL, backbone_state_dict: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """Converts a trained FPN-MIL (``PyramidalMILmodel``) state dict to variables of ``model``.

  Args:
    state_dict: the reference checkpoint (``{'model': ...}`` or the bare state dict).
    model: the Flax `FPNMIL` with the configuration it was trained with. Its input mode decides
      what is read: backbone + FPN + head, FPN + head, or the head alone (extra keys for the
      parts the model lacks are ignored).
    backbone_state_dict: a Mammo-CLIP checkpoint to take the backbone from when ``model`` has a
      backbone and ``state_dict`` has none (a model trained on offline features, run online).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (batch stats only with a backbone).

  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch.
  """
  state = {
    k: v for k, v in unwrap_state_dict(state_dict).items() if not k.endswith(_IGNORED_SUFFIXES)
  }
  has_backbone = any(k.startswith(FPN_MIL_BACKBONE_PREFIX) for k in state)
  if model.backbone is not None and not has_backbone and backbone_state_dict is None:
    raise ValueError(
      "the model has a backbone but the FPN-MIL checkpoint has no "
      f"{FPN_MIL_BACKBONE_PREFIX}* weights (it was trained on offline features); "
      "pass the Mammo-CLIP checkpoint as backbone_state_dict."
    )
  head = model.head
  pooling_gated = head.pooling_type == "gated-attention"
  scale_gated = head.scale_aggregator == "gated-attention"

  def key_fn(path: tuple[str, ...]) -> str:
    if path[0] == "backbone":
      return FPN_MIL_BACKBONE_PREFIX + _efficientnet_key(path[1:])
    if path[0] == "fpn":
      return "inst_encoder." + _fpn_key(path[1:])
    return _head_key(path[1:], pooling_gated, scale_gated)

  abstract = _abstract_variables(model, _example_inputs(model, state))
  used: set[str] = set()
  missing: list[str] = []
  mismatched: list[str] = []
  from_checkpoint = (lambda path: True) if has_backbone else (lambda path: path[0] != "backbone")
  variables = _fill(abstract, state, key_fn, used, missing, mismatched, only=from_checkpoint)
  if model.backbone is not None and not has_backbone:
    backbone = import_efficientnet(backbone_state_dict, model.backbone)
    for collection, tree in backbone.items():
      variables.setdefault(collection, {})["backbone"] = tree
  outside = []
  if model.backbone is None:
    outside.append(FPN_MIL_BACKBONE_PREFIX)
  if model.fpn is None:
    outside.append("inst_encoder.")
  unexpected = sorted(
    k for k in set(state) - used if not k.startswith(tuple(outside)) and not _shared_norm_copy(k)
  )
  raise_if_mismatched(
    "FPN-MIL checkpoint",
    missing,
    unexpected,
    mismatched,
    "Build FPNMIL with the scales, encoder/pooling types, widths and FPN GroupNorm "
    "setting the checkpoint was trained with.",
  )
  return variables


def _shared_norm_copy(key: str) -> bool:
  """The shared FPN GroupNorm appears under all four conv blocks; one copy is read."""
  return (
    key.startswith("inst_encoder.")
    and key.split(".")[-2] == "1"
    and (".inner_block_" in key or ".layer_block_" in key)
    and ".inner_block_0.1." not in key
  )
