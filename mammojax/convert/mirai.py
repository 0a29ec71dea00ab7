"""Mirai ResNet-18 backbone weights from PyTorch state dicts -> :class:`MiraiResNet18` variables.

Two key layouts hold the backbone:

* Mirai's own (``onconet`` ``ResNet``): ``<root>downsampler.conv1.weight``,
  ``<root>layer2_0.downsample.0.weight``, ... where ``<root>`` is whatever wraps the ResNet, e.g.
  ``module._model.`` for the released ``mgh_mammo_MIRAI_Base_May20_2019.p`` (an
  ``nn.DataParallel`` around ``CustomResnet``, whose ResNet is ``_model``) or
  ``image_encoder._model.`` inside ``MiraiFull``. Everything else in such a dict (pooling,
  classifier, risk-factor and survival heads) is not part of the backbone and is skipped.
* BCRBench's ``nn.Sequential`` extraction: ``<root>0.`` (downsampler) to ``<root>8.`` (layer4_1),
  e.g. ``encoder.0.conv1.weight`` in an ImgFeatAlign checkpoint.

Mirai snapshots are whole pickled modules (``torch.save(model)``), not state dicts; unpickling
them needs Mirai's ``onconet`` package importable. Turn one into a state dict once, where Mirai is
installed: ``m = torch.load(path, map_location='cpu', weights_only=False);
torch.save(m.state_dict(), 'mirai_state.pt')``, and convert that file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mammojax.convert.layouts import torch_conv_kernel
from mammojax.nn.resnet import STAGE_NAMES

BLOCK_NAMES = ("downsampler",) + STAGE_NAMES
PROJECTED_BLOCKS = ("layer2_0", "layer3_0", "layer4_0")
_BN_STATS_IGNORED = "num_batches_tracked"


def find_backbone(state_dict: Mapping[str, Any]) -> tuple[dict[str, str], str]:
  """Locates the backbone: ``({flax block name: torch key prefix}, layout name)``.

  Raises ValueError naming what was looked for when no (or more than one) backbone is present.
  """
  mirai_roots = [
    k[: -len("downsampler.conv1.weight")]
    for k in state_dict
    if k.endswith("downsampler.conv1.weight")
  ]
  sequential_roots = [
    k[: -len("0.conv1.weight")]
    for k in state_dict
    if k.endswith("0.conv1.weight") and f"{k[: -len('0.conv1.weight')]}8.conv2.weight" in state_dict
  ]
  if len(mirai_roots) == 1:
    root = mirai_roots[0]
    return {name: f"{root}{name}." for name in BLOCK_NAMES}, f"mirai (prefix {root!r})"
  if not mirai_roots and len(sequential_roots) == 1:
    root = sequential_roots[0]
    return (
      {name: f"{root}{index}." for index, name in enumerate(BLOCK_NAMES)},
      f"sequential (prefix {root!r})",
    )
  raise ValueError(
    "no unique Mirai ResNet-18 backbone in the state dict: expected exactly one key ending in "
    "'downsampler.conv1.weight' (Mirai layout) or one '<p>0.conv1.weight' with "
    f"'<p>8.conv2.weight' (BCRBench encoder); found Mirai roots {mirai_roots} and sequential "
    f"roots {sequential_roots}. Sample keys: {sorted(state_dict)[:8]}"
  )


def import_backbone(
  state_dict: Mapping[str, Any], prefixes: Mapping[str, str]
) -> tuple[dict[str, Any], set[str]]:
  """Backbone variables and the torch keys they consumed.

  Args:
    state_dict: torch names -> numpy arrays.
    prefixes: flax block name -> torch key prefix (from :func:`find_backbone`).
  Returns:
    ``({'params': ..., 'batch_stats': ...}, consumed keys)`` for ``MiraiResNet18``.
  """
  consumed: set[str] = set()

  def take(key: str) -> np.ndarray:
    if key not in state_dict:
      raise KeyError(
        f"backbone weight {key!r} missing from the state dict; is this a Mirai "
        "ResNet-18 (block_layout 'BasicBlock,2' x 4)?"
      )
    consumed.add(key)
    return np.array(state_dict[key], dtype=np.float32)  # a copy: never alias torch memory

  def batch_norm(prefix: str) -> tuple[dict, dict]:
    if f"{prefix}{_BN_STATS_IGNORED}" in state_dict:
      consumed.add(f"{prefix}{_BN_STATS_IGNORED}")
    return (
      {"scale": take(f"{prefix}weight"), "bias": take(f"{prefix}bias")},
      {"mean": take(f"{prefix}running_mean"), "var": take(f"{prefix}running_var")},
    )

  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  for name in BLOCK_NAMES:
    prefix = prefixes[name]
    block_params: dict[str, Any] = {
      "conv1": {"kernel": torch_conv_kernel(take(f"{prefix}conv1.weight"))}
    }
    block_stats: dict[str, Any] = {}
    block_params["bn1"], block_stats["bn1"] = batch_norm(f"{prefix}bn1.")
    if name != "downsampler":
      block_params["conv2"] = {"kernel": torch_conv_kernel(take(f"{prefix}conv2.weight"))}
      block_params["bn2"], block_stats["bn2"] = batch_norm(f"{prefix}bn2.")
    if name in PROJECTED_BLOCKS:
      block_params["downsample_conv"] = {
        "kernel": torch_conv_kernel(take(f"{prefix}downsample.0.weight"))
      }
      block_params["downsample_bn"], block_stats["downsample_bn"] = batch_norm(
        f"{prefix}downsample.1."
      )
    params[name], stats[name] = block_params, block_stats
  in_channels = params["downsampler"]["conv1"]["kernel"].shape[2]
  if in_channels != 3:
    raise ValueError(
      f"the backbone's first conv takes {in_channels} channels; MiraiResNet18 "
      "expects Mirai's 3-channel input"
    )
  return {"params": params, "batch_stats": stats}, consumed


def backbone_width(variables: Mapping[str, Any]) -> int:
  """``base_width`` of imported backbone variables (64 for Mirai)."""
  return int(variables["params"]["downsampler"]["conv1"]["kernel"].shape[-1])


def import_mirai(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A Mirai (or BCRBench encoder) state dict -> ``{'params', 'batch_stats'}`` of
  ``MiraiResNet18(base_width=backbone_width(result))``. Non-backbone keys are ignored."""
  prefixes, _ = find_backbone(state_dict)
  variables, _ = import_backbone(state_dict, prefixes)
  return variables
