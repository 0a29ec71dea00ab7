"""torchvision ResNet-18/34/50 state dicts -> :class:`mammojax.nn.resnet.ResNet` variables.

torchvision's keys (``torchvision.models.resnet18(...).state_dict()``):

* stem: ``conv1.weight``, ``bn1.{weight,bias,running_mean,running_var}``;
* blocks: ``layer{s}.{b}.conv{1,2[,3]}.weight``, ``layer{s}.{b}.bn{1,2[,3]}.*`` and, for a block
  with a projection shortcut, ``layer{s}.{b}.downsample.0.weight`` (1x1 conv) and
  ``layer{s}.{b}.downsample.1.*`` (its BN);
* classifier (optional): ``fc.weight``, ``fc.bias``.

They may sit behind a common prefix (``module.``, ``backbone.``, ...): the root is found from the
one key ending in ``layer1.0.conv1.weight``. The depth follows from the blocks per stage and from
whether blocks have a ``conv3`` (bottleneck), ``base_width`` from the stem's channels and
``num_classes`` from ``fc.weight`` (0 without one). Every imported array is checked against the
shape :class:`ResNet` expects. ``num_batches_tracked`` is dropped; a key under the root that looks
like part of the ResNet but is not imported (``layer5.*``, ``layer1.0.conv4.weight``, ...) is an
error rather than silently lost; other keys (heads of a wrapping model) are left unconsumed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mammojax.convert.layouts import (
  torch_conv_kernel,
  torch_conv_kernel_shape,
  torch_dense_kernel,
  torch_dense_kernel_shape,
)
from mammojax.nn.resnet import RESNET_DEPTHS, Bottleneck, ResNet

_ANCHOR = "layer1.0.conv1.weight"
_BN_STATS_IGNORED = "num_batches_tracked"
# Keys under the root that belong to a torchvision ResNet (and so must all be imported).
_RESNET_KEY = re.compile(r"(conv1|bn1|fc|layer\d+)\.")


def find_root(state_dict: Mapping[str, Any]) -> str:
  """The prefix before torchvision's ResNet keys (``''``, ``'module.'``, ``'backbone.'``, ...).

  Raises ValueError when no key, or more than one, ends in ``layer1.0.conv1.weight``.
  """
  roots = [
    k[: -len(_ANCHOR)]
    for k in state_dict
    if k.endswith(_ANCHOR) and (k == _ANCHOR or k[: -len(_ANCHOR)].endswith("."))
  ]
  if len(roots) != 1:
    found = "none" if not roots else f"several (prefixes {sorted(roots)})"
    raise ValueError(
      f"not a torchvision ResNet state dict: expected exactly one key ending in {_ANCHOR!r}, "
      f"found {found}. Sample keys: {sorted(state_dict)[:8]}"
    )
  return roots[0]


def _stage_sizes(state_dict: Mapping[str, Any], root: str) -> tuple[int, ...]:
  sizes = []
  for stage in range(1, 5):
    count = 0
    while f"{root}layer{stage}.{count}.conv1.weight" in state_dict:
      count += 1
    sizes.append(count)
  return tuple(sizes)


def infer_fields(state_dict: Mapping[str, Any], root: str = "") -> dict[str, int]:
  """``{'depth', 'base_width', 'num_classes'}`` of the ResNet under ``root``.

  Raises ValueError when the block counts (or block type) match none of ResNet-18/34/50.
  """
  sizes = _stage_sizes(state_dict, root)
  bottleneck = f"{root}layer1.0.conv3.weight" in state_dict
  matches = [
    depth
    for depth, (stage_sizes, block) in RESNET_DEPTHS.items()
    if stage_sizes == sizes and (block is Bottleneck) == bottleneck
  ]
  if not matches:
    kind = "bottleneck" if bottleneck else "basic"
    supported = ", ".join(
      f"ResNet-{d}: {s} {'bottleneck' if b is Bottleneck else 'basic'}"
      for d, (s, b) in RESNET_DEPTHS.items()
    )
    raise ValueError(
      f"unsupported ResNet under prefix {root!r}: {sizes} {kind} blocks per stage (counted "
      f"from '{root}layer<s>.<b>.conv1.weight'); supported: {supported}"
    )
  stem_key = f"{root}conv1.weight"
  if stem_key not in state_dict:
    raise ValueError(f"ResNet stem weight {stem_key!r} missing from the state dict")
  fc_key = f"{root}fc.weight"
  return {
    "depth": matches[0],
    "base_width": int(np.shape(state_dict[stem_key])[0]),
    "num_classes": int(np.shape(state_dict[fc_key])[0]) if fc_key in state_dict else 0,
  }


def _expected_shapes(fields: Mapping[str, int]) -> dict[str, Any]:
  """Variable shapes of ``ResNet(**fields)``, without computing anything."""
  model = ResNet(**fields)
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, use_running_average=True), images
  )
  return nn.meta.unbox(variables)


def import_resnet(
  state_dict: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, int], set[str]]:
  """A torchvision ResNet-18/34/50 state dict -> variables, model fields and consumed keys.

  Args:
    state_dict: torch names -> arrays (numpy or CPU tensors), torchvision's layout, optionally
      behind a common prefix.
  Returns:
    ``({'params', 'batch_stats'}, {'depth', 'base_width', 'num_classes'}, consumed keys)``:
    build ``ResNet(**fields)`` to apply the variables. ``num_batches_tracked`` keys count as
    consumed (they are dropped).
  Raises:
    ValueError: not a (supported) torchvision ResNet, a weight missing or of the wrong shape,
      or keys under the root that look like ResNet weights but are not imported.
  """
  root = find_root(state_dict)
  fields = infer_fields(state_dict, root)
  expected = _expected_shapes(fields)
  consumed: set[str] = set()

  def take(key: str, torch_shape: tuple[int, ...]) -> np.ndarray:
    if key not in state_dict:
      raise ValueError(
        f"ResNet-{fields['depth']} weight {key!r} missing from the state dict (expected torch "
        f"shape {torch_shape})"
      )
    value = np.array(state_dict[key], dtype=np.float32)  # a copy: never alias torch memory
    if value.shape != torch_shape:
      raise ValueError(
        f"{key!r} has shape {value.shape}; ResNet-{fields['depth']} with base_width "
        f"{fields['base_width']} expects {torch_shape}"
      )
    consumed.add(key)
    return value

  def conv(key: str, want: Any) -> dict[str, np.ndarray]:
    shape = tuple(want["kernel"].shape)
    return {"kernel": torch_conv_kernel(take(key, torch_conv_kernel_shape(shape)))}

  def batch_norm(prefix: str, want_params: Any, want_stats: Any) -> tuple[dict, dict]:
    if f"{prefix}{_BN_STATS_IGNORED}" in state_dict:
      consumed.add(f"{prefix}{_BN_STATS_IGNORED}")
    vector = lambda key, want: take(key, tuple(want.shape))  # noqa: E731
    return (
      {
        "scale": vector(f"{prefix}weight", want_params["scale"]),
        "bias": vector(f"{prefix}bias", want_params["bias"]),
      },
      {
        "mean": vector(f"{prefix}running_mean", want_stats["mean"]),
        "var": vector(f"{prefix}running_var", want_stats["var"]),
      },
    )

  want_params, want_stats = expected["params"], expected["batch_stats"]
  params: dict[str, Any] = {"conv1": conv(f"{root}conv1.weight", want_params["conv1"])}
  stats: dict[str, Any] = {}
  params["bn1"], stats["bn1"] = batch_norm(f"{root}bn1.", want_params["bn1"], want_stats["bn1"])
  for name, want_block in want_params.items():
    if not name.startswith("layer"):
      continue
    stage, index = name[len("layer") :].split("_")
    prefix = f"{root}layer{stage}.{index}."
    block_params: dict[str, Any] = {}
    block_stats: dict[str, Any] = {}
    for sub in want_block:
      if sub.startswith("conv"):
        block_params[sub] = conv(f"{prefix}{sub}.weight", want_block[sub])
      elif sub.startswith("bn"):
        block_params[sub], block_stats[sub] = batch_norm(
          f"{prefix}{sub}.", want_block[sub], want_stats[name][sub]
        )
      elif sub == "downsample_conv":
        block_params[sub] = conv(f"{prefix}downsample.0.weight", want_block[sub])
      elif sub == "downsample_bn":
        block_params[sub], block_stats[sub] = batch_norm(
          f"{prefix}downsample.1.", want_block[sub], want_stats[name][sub]
        )
    params[name], stats[name] = block_params, block_stats
  if fields["num_classes"]:
    kernel_shape = tuple(want_params["fc"]["kernel"].shape)
    params["fc"] = {
      "kernel": torch_dense_kernel(
        take(f"{root}fc.weight", torch_dense_kernel_shape(kernel_shape))
      ),
      "bias": take(f"{root}fc.bias", (fields["num_classes"],)),
    }

  leftover = sorted(
    k
    for k in state_dict
    if k not in consumed and k.startswith(root) and _RESNET_KEY.match(k[len(root) :])
  )
  if leftover:
    raise ValueError(
      f"keys under prefix {root!r} look like ResNet-{fields['depth']} weights but are not part "
      f"of it (a different architecture?): {leftover[:10]}"
      + (f" and {len(leftover) - 10} more" if len(leftover) > 10 else "")
    )
  return {"params": params, "batch_stats": stats}, fields, consumed
