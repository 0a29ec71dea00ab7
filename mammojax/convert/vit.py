"""torchvision / timm Vision Transformer state dicts -> :class:`mammojax.nn.vit.VisionTransformer`.

Two layouts are recognised by their position-embedding key (an optional prefix such as
``module.`` or ``backbone.`` before every key is tolerated):

* ``torchvision`` (``vit_b_16`` and friends): ``conv_proj.*``, ``class_token``,
  ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.{ln_1, self_attention.in_proj_*,
  self_attention.out_proj, ln_2, mlp.0, mlp.3}.*`` (``mlp.linear_{1,2}`` of older releases too),
  ``encoder.ln.*`` and an optional ``heads.head.*``. ``heads.pre_logits`` (a
  ``representation_size`` head) and a convolutional stem (``conv_proj.conv_*``) are refused.
* ``timm`` (``vit_base_patch16_224`` and friends): ``patch_embed.proj.*``, ``cls_token``,
  ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``,
  ``norm.*`` and an optional ``head.*``. A ``fc_norm`` (global average pooling) is refused, and
  so is any other extra (layer scale, register tokens, pre-norm, ...) as an unexpected key.

The sizes come from the shapes; the head count is not stored: ``hidden_dim // 64`` (64-wide heads,
as every ViT-Ti/S/B/L/H) unless given. Images must have 3 input channels (grayscale inputs are
repeated by the model) and a square patch grid with the class token in the position embedding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mammojax.convert.layouts import torch_attention_params, torch_conv_kernel, torch_dense_kernel
from mammojax.nn.vit import VisionTransformer

# The position embedding names each layout: present in every ViT, with no prefix clash.
_ANCHORS = {"torchvision": "encoder.pos_embedding", "timm": "pos_embed"}

_TORCHVISION = {
  "patch": "conv_proj",
  "class_token": "class_token",
  "pos": "encoder.pos_embedding",
  "block": "encoder.layers.encoder_layer_{}.",
  "norm1": "ln_1",
  "norm2": "ln_2",
  "fc1": "mlp.0",
  "fc2": "mlp.3",
  "norm": "encoder.ln",
  "head": "heads.head",
}
_TIMM = {
  "patch": "patch_embed.proj",
  "class_token": "cls_token",
  "pos": "pos_embed",
  "block": "blocks.{}.",
  "norm1": "norm1",
  "norm2": "norm2",
  "fc1": "mlp.fc1",
  "fc2": "mlp.fc2",
  "norm": "norm",
  "head": "head",
}


def _find_layout(keys: list[str]) -> tuple[str, str]:
  """The layout name and key prefix, from the position embedding key."""
  found = [
    (layout, key[: len(key) - len(anchor)])
    for key in keys
    for layout, anchor in _ANCHORS.items()
    if key == anchor or key.endswith("." + anchor)
  ]
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
      f"not a torchvision or timm ViT state dict: {what} position embedding key "
      f"('encoder.pos_embedding' for torchvision, 'pos_embed' for timm) among "
      f"{len(keys)} keys (first: {keys[:5]})"
    )
  return found[0]


def _block_count(keys: list[str], pattern: str) -> int:
  indices = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
  if not indices or indices != set(range(len(indices))):
    raise ValueError(f"ViT blocks are not numbered 0..n-1: found indices {sorted(indices)}")
  return len(indices)


def import_vit(
  state_dict: Mapping[str, np.ndarray], num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, int], str]:
  """A torchvision or timm ViT state dict -> ``VisionTransformer`` variables, sizes, layout.

  Args:
    state_dict: torch names -> numpy arrays (or array-likes), optionally all under one prefix.
    num_heads: attention heads of the trained model; default ``hidden_dim // 64``.
  Returns:
    ``({'params': ...}, model_fields, layout)``: float32 numpy params for
    ``VisionTransformer(**model_fields)``; ``model_fields`` holds ``patch_size``, ``hidden_dim``,
    ``depth``, ``num_heads``, ``mlp_dim``, ``num_classes`` (0 without a head) and
    ``image_size``; ``layout`` is ``'torchvision'`` or ``'timm'``.
  Raises:
    ValueError: an unknown layout, an unsupported variant, a malformed shape, a missing key, or
      keys left over (named).
  """
  keys = list(state_dict)
  layout, prefix = _find_layout(keys)
  names = _TORCHVISION if layout == "torchvision" else _TIMM
  consumed: set[str] = set()

  def has(key: str) -> bool:
    return prefix + key in state_dict

  def take(key: str) -> np.ndarray:
    if not has(key):
      raise ValueError(f"{layout} ViT weight {prefix + key!r} missing from the state dict")
    consumed.add(prefix + key)
    return np.array(state_dict[prefix + key], dtype=np.float32)  # a copy: never alias torch

  def dense(name: str) -> dict[str, np.ndarray]:
    return {"kernel": torch_dense_kernel(take(f"{name}.weight")), "bias": take(f"{name}.bias")}

  def layer_norm(name: str) -> dict[str, np.ndarray]:
    return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

  _refuse_variants(layout, has, [k[len(prefix) :] for k in keys if k.startswith(prefix)])
  patch_weight = take(f"{names['patch']}.weight")
  if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
    raise ValueError(
      f"{names['patch']}.weight has shape {patch_weight.shape}; expected [D, 3, p, p]"
    )
  hidden_dim, channels, patch_size = patch_weight.shape[:3]
  if channels != 3:
    raise ValueError(
      f"{names['patch']}.weight takes {channels} input channels; VisionTransformer takes 3 "
      "(grayscale images are repeated to 3)"
    )
  position = take(names["pos"])
  tokens = position.shape[1] - 1 if position.ndim == 3 else -1
  side = math.isqrt(max(tokens, 0))
  if position.shape != (1, tokens + 1, hidden_dim) or side * side != tokens or side == 0:
    raise ValueError(
      f"{names['pos']} has shape {position.shape}; expected [1, 1 + s * s, {hidden_dim}] (the "
      "class token's embedding, then a square patch grid)"
    )
  block = names["block"]
  depth = _block_count(
    [k[len(prefix) :] for k in keys if k.startswith(prefix)],
    re.escape(block.format("@")).replace("@", r"(\d+)"),
  )
  heads = hidden_dim // 64 if num_heads is None else int(num_heads)
  params: dict[str, Any] = {
    "conv_proj": {
      "kernel": torch_conv_kernel(patch_weight),
      "bias": take(f"{names['patch']}.bias"),
    },
    "class_token": take(names["class_token"]),
    "pos_embedding": position,
  }
  for i in range(depth):
    prefix_i = block.format(i)
    attention = (
      ("self_attention.in_proj_weight", "self_attention.in_proj_bias", "self_attention.out_proj")
      if layout == "torchvision"
      else ("attn.qkv.weight", "attn.qkv.bias", "attn.proj")
    )
    fc1, fc2 = names["fc1"], names["fc2"]
    if layout == "torchvision" and not has(f"{prefix_i}{fc1}.weight"):
      fc1, fc2 = "mlp.linear_1", "mlp.linear_2"  # torchvision < 0.13
    params[f"encoder_layer_{i}"] = {
      "norm1": layer_norm(prefix_i + names["norm1"]),
      "attn": torch_attention_params(
        take(prefix_i + attention[0]),
        take(prefix_i + attention[1]),
        take(f"{prefix_i}{attention[2]}.weight"),
        take(f"{prefix_i}{attention[2]}.bias"),
        heads,
        name=prefix + prefix_i + attention[0],
      ),
      "norm2": layer_norm(prefix_i + names["norm2"]),
      "ff_in": dense(prefix_i + fc1),
      "ff_out": dense(prefix_i + fc2),
    }
  params["encoder_norm"] = layer_norm(names["norm"])
  num_classes = 0
  if has(f"{names['head']}.weight"):
    params["head"] = dense(names["head"])
    num_classes = int(params["head"]["kernel"].shape[1])
  unexpected = sorted(set(keys) - consumed)
  if unexpected:
    raise ValueError(
      f"{len(unexpected)} unexpected keys in the {layout} ViT state dict (a variant "
      f"VisionTransformer does not build): {unexpected[:10]}"
    )
  fields = {
    "patch_size": int(patch_size),
    "hidden_dim": int(hidden_dim),
    "depth": depth,
    "num_heads": heads,
    "mlp_dim": int(params["encoder_layer_0"]["ff_in"]["kernel"].shape[1]) if depth else 0,
    "num_classes": num_classes,
    "image_size": int(side * patch_size),
  }
  params = jax.tree.map(np.ascontiguousarray, params)
  _check_shapes(params, fields, layout)
  return {"params": params}, fields, layout


def _refuse_variants(layout: str, has: Callable[[str], bool], keys: list[str]) -> None:
  """Clear errors for the variants that VisionTransformer does not build."""
  if layout == "torchvision":
    if has("heads.pre_logits.weight"):
      raise ValueError(
        "torchvision ViT with representation_size (heads.pre_logits + tanh before the head) "
        "is not supported; VisionTransformer has a single linear head"
      )
    if any(k.startswith("conv_proj.conv_") for k in keys):
      raise ValueError(
        "torchvision ViT with a convolutional stem (conv_stem_configs) is not supported; "
        "VisionTransformer embeds patches with one conv_proj"
      )
  elif has("fc_norm.weight"):
    raise ValueError(
      "timm ViT with fc_norm (global_pool='avg' and friends: pooled tokens normalised after "
      "pooling) is not supported; VisionTransformer reads the class token after the final norm"
    )
  if not has(_TORCHVISION["class_token"] if layout == "torchvision" else _TIMM["class_token"]):
    raise ValueError(f"{layout} ViT without a class token is not supported")


def _check_shapes(params: dict[str, Any], fields: dict[str, int], layout: str) -> None:
  """Every parameter of ``VisionTransformer(**fields)`` present with its shape, nothing else."""
  model = VisionTransformer(**fields)
  size = fields["image_size"]
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  )
  expected = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
  got = traverse_util.flatten_dict(params)
  wrong = [
    f"{'/'.join(path)}: {got[path].shape if path in got else 'missing'} != {leaf.shape}"
    for path, leaf in expected.items()
    if path not in got or got[path].shape != leaf.shape
  ] + [f"{'/'.join(path)}: not in the model" for path in got if path not in expected]
  if wrong:
    raise ValueError(f"{layout} ViT params do not fit VisionTransformer({fields}): {wrong[:10]}")
