"""MONAI ``UNETR`` state dicts -> :class:`mammojax.models.segmentation.unetr.UNETR`.

Keys (after an optional prefix such as ``model.``, found from the position embedding):

* ``vit.patch_embedding.patch_embeddings.{weight,bias}`` -> ``vit/conv_proj/{kernel,bias}``;
  ``vit.patch_embedding.position_embeddings`` ``[1, N, D]`` -> ``vit/pos_embedding``;
* ``vit.blocks.{i}.{norm1,norm2}.{weight,bias}`` -> ``vit/encoder_layer_{i}/{norm1,norm2}/
  {scale,bias}``; ``mlp.linear1`` / ``mlp.linear2`` -> ``ff_in`` / ``ff_out``;
* ``vit.blocks.{i}.attn.qkv.weight`` ``[3D, D]`` (rows ordered query, key, value, then head,
  then head dim: MONAI's ``'b h (qkv l d) -> qkv b l h d'``), ``attn.qkv.bias`` when
  ``qkv_bias``, ``attn.out_proj`` -> ``attn/{query,key,value,out}``;
* ``vit.norm`` -> ``vit/encoder_norm``;
* the conv stages by :mod:`mammojax.nn.unet_blocks`' names: ``encoder1.layer.conv1.conv.weight``
  -> ``encoder1/layer/conv1/kernel``, ``encoder2.blocks.0.0.conv.weight`` ->
  ``encoder2/blocks_0_0/kernel``, ``out.conv.conv.{weight,bias}`` -> ``out/conv/{kernel,bias}``;
  transposed-conv weights (``transp_conv*``, ``blocks.{i}.0``) keep torch's tap order
  (:class:`~mammojax.nn.conv_blocks.TransposedConvStride2` paints as torch does).

MONAI 1.6 saves a ``vit.blocks.{i}.norm_cross_attn`` LayerNorm that no forward pass uses, and
older releases ``vit.blocks.{i}.cross_attn.*`` weights; both are skipped and listed. Sizes come
from the shapes: ``in_channels`` and the spatial dims from the patch embedding, ``hidden_size``,
``mlp_dim``, ``feature_size``, ``out_channels``, ``qkv_bias``, ``res_block`` and ``conv_block``
from which keys exist, and the patch grid from the position embedding (a cube or square unless
``img_size`` is given). ``num_heads`` is not stored: MONAI's default 12 unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mammojax.convert.basic_unet import (
  Path,
  Rule,
  Shape,
  abstract_params,
  conv_rule,
  convert_by_rules,
  copy_rule,
  find_prefix,
  shape_of,
  transposed_conv_rule,
)
from mammojax.convert.layouts import torch_attention_params, torch_dense_kernel
from mammojax.models.segmentation.unetr import NUM_LAYERS, PATCH_SIZE, UNETR

WHAT = "MONAI UNETR"
POSITION_KEY = "vit.patch_embedding.position_embeddings"
PATCH_KEY = "vit.patch_embedding.patch_embeddings.weight"
# Weights MONAI saves but never uses without cross-attention.
UNUSED_KEY = re.compile(r"vit\.blocks\.\d+\.(norm_cross_attn|cross_attn)\.")
_TRANSPOSED_MODULE = re.compile(r"transp_conv(_init)?|blocks_\d+(_0)?")


def _grid(tokens: int, dims: int, img_size: int | Sequence[int] | None) -> tuple[int, ...]:
  """The patch grid of ``tokens`` position embeddings."""
  if img_size is not None:
    sides = (int(img_size),) * dims if isinstance(img_size, int) else tuple(map(int, img_size))
    grid = tuple(side // PATCH_SIZE for side in sides)
    if len(sides) != dims or any(side % PATCH_SIZE for side in sides) or np.prod(grid) != tokens:
      raise ValueError(
        f"img_size={img_size} does not fit the weights: {POSITION_KEY} holds {tokens} patches "
        f"of a {dims}-D grid (img_size = 16 x grid, one side per axis)"
      )
    return grid
  side = round(tokens ** (1.0 / dims))
  if side**dims != tokens:
    raise ValueError(
      f"{POSITION_KEY} holds {tokens} patches, not a {dims}-D cube of them; pass img_size "
      "(the sides the model was trained on)"
    )
  return (side,) * dims


def infer_unetr(
  state_dict: Mapping[str, Any],
  *,
  num_heads: int = 12,
  img_size: int | Sequence[int] | None = None,
) -> tuple[dict[str, Any], int]:
  """``(model_fields, in_channels)`` read from a MONAI UNETR state dict (module docstring)."""
  prefix = find_prefix(state_dict, POSITION_KEY, WHAT)
  has = lambda key: prefix + key in state_dict
  size = lambda key: shape_of(state_dict, prefix + key, WHAT)
  patch = size(PATCH_KEY)
  position = size(POSITION_KEY)
  dims = len(patch) - 2
  if dims < 1 or any(p != PATCH_SIZE for p in patch[2:]) or len(position) != 3:
    raise ValueError(
      f"{prefix + PATCH_KEY} {patch} / {prefix + POSITION_KEY} {position}: expected "
      f"[D, C, 16, ...] (UNETR's patch size is 16) and [1, N, D]"
    )
  blocks = {
    int(m.group(1))
    for key in state_dict
    if (m := re.match(rf"{re.escape(prefix)}vit\.blocks\.(\d+)\.", key))
  }
  if blocks != set(range(NUM_LAYERS)):
    raise ValueError(
      f"UNETR has {NUM_LAYERS} ViT blocks (vit.blocks.0-11); the state dict has block indices "
      f"{sorted(blocks)}"
    )
  grid = _grid(int(position[1]), dims, img_size)
  fields = {
    "out_channels": int(size("out.conv.conv.weight")[0]),
    "img_size": tuple(PATCH_SIZE * g for g in grid),
    "feature_size": int(size("encoder1.layer.conv1.conv.weight")[0]),
    "hidden_size": int(patch[0]),
    "mlp_dim": int(size("vit.blocks.0.mlp.linear1.weight")[0]),
    "num_heads": int(num_heads),
    "conv_block": has("encoder2.blocks.0.0.conv.weight"),
    "res_block": has("decoder5.conv_block.conv3.conv.weight"),
    "qkv_bias": has("vit.blocks.0.attn.qkv.bias"),
  }
  if fields["hidden_size"] % fields["num_heads"]:
    raise ValueError(
      f"hidden size {fields['hidden_size']} (from {prefix + PATCH_KEY}) is not a multiple of "
      f"num_heads={num_heads}; pass the number of heads the model was trained with"
    )
  return fields, int(patch[1])


def _attention_rule(block: str, layer: Path, dim: int, heads: int, qkv_bias: bool) -> Rule:
  """The fused ``qkv`` and ``out_proj`` of one SABlock -> the four Flax projections."""
  keys = [
    f"{block}.attn.qkv.weight",
    f"{block}.attn.out_proj.weight",
    f"{block}.attn.out_proj.bias",
  ]
  shapes = [(3 * dim, dim), (dim, dim), (dim,)]
  paths = [(*layer, "attn", name, "kernel") for name in ("query", "key", "value", "out")]
  paths.append((*layer, "attn", "out", "bias"))
  if qkv_bias:
    keys.append(f"{block}.attn.qkv.bias")
    shapes.append((3 * dim,))
    paths += [(*layer, "attn", name, "bias") for name in ("query", "key", "value")]

  def convert(qkv, out_weight, out_bias, qkv_b=None):
    bias = np.zeros(3 * dim, np.float32) if qkv_b is None else qkv_b
    params = torch_attention_params(qkv, bias, out_weight, out_bias, heads, name=keys[0])
    values = [params[name]["kernel"] for name in ("query", "key", "value", "out")]
    values.append(params["out"]["bias"])
    if qkv_b is not None:
      values += [params[name]["bias"] for name in ("query", "key", "value")]
    return values

  return Rule(tuple(keys), tuple(shapes), tuple(paths), convert)


def _vit_rules(expected: dict[Path, Shape], fields: dict[str, Any]) -> list[Rule]:
  vit = {path: shape for path, shape in expected.items() if path[0] == "vit"}
  rules = []
  for path, shape in vit.items():
    module, leaf = path[1], path[-1]
    torch_leaf = "bias" if leaf == "bias" else "weight"
    if module == "conv_proj":
      key = f"vit.patch_embedding.patch_embeddings.{torch_leaf}"
      rules.append(conv_rule(key, path, shape) if leaf == "kernel" else copy_rule(key, path, shape))
    elif module == "pos_embedding":
      rules.append(copy_rule(POSITION_KEY, path, shape))
    elif module == "encoder_norm":
      rules.append(copy_rule(f"vit.norm.{torch_leaf}", path, shape))
    elif path[2] in ("norm1", "norm2", "ff_in", "ff_out"):
      i = int(module.removeprefix("encoder_layer_"))
      name = {"ff_in": "mlp.linear1", "ff_out": "mlp.linear2"}.get(path[2], path[2])
      key = f"vit.blocks.{i}.{name}.{torch_leaf}"
      if leaf == "kernel":
        rules.append(
          Rule((key,), ((shape[1], shape[0]),), (path,), lambda w: (torch_dense_kernel(w),))
        )
      else:
        rules.append(copy_rule(key, path, shape))
    elif path[2] != "attn":
      raise AssertionError(f"UNETR parameter {'/'.join(path)} has no MONAI counterpart")
  for i in range(NUM_LAYERS):
    rules.append(
      _attention_rule(
        f"vit.blocks.{i}",
        ("vit", f"encoder_layer_{i}"),
        fields["hidden_size"],
        fields["num_heads"],
        fields["qkv_bias"],
      )
    )
  return rules


def conv_stage_rule(path: Path, shape: Shape) -> Rule:
  """The rule of one :mod:`mammojax.nn.unet_blocks` parameter: ``encoder2/blocks_0_1/conv1/kernel``
  <- ``encoder2.blocks.0.1.conv1.conv.weight``. Also imports a
  lone block: its paths are then relative to the block, as MONAI's keys."""
  *module, leaf = path
  parts = [re.sub(r"^blocks_(\d+)(?:_(\d+))?$", _blocks_key, part) for part in module]
  key = ".".join([*parts, "conv", "bias" if leaf == "bias" else "weight"])
  if leaf != "kernel":
    return copy_rule(key, path, shape)
  if _TRANSPOSED_MODULE.fullmatch(module[-1]):
    return transposed_conv_rule(key, path, shape)
  return conv_rule(key, path, shape)


def _blocks_key(match: re.Match) -> str:
  return "blocks." + ".".join(g for g in match.groups() if g is not None)


def import_unetr(
  state_dict: Mapping[str, Any],
  *,
  num_heads: int = 12,
  img_size: int | Sequence[int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
  """A MONAI UNETR state dict -> ``UNETR`` variables, model fields and the skipped keys.

  Args:
    state_dict: torch names -> numpy arrays (or array-likes), optionally under one prefix.
    num_heads: attention heads of the trained model (not stored; MONAI's default 12).
    img_size: the input sides the model was trained on; default: a cube (square) from the
      position embedding's patch count.
  Returns:
    ``({'params': ...}, model_fields, skipped)``: float32 params for ``UNETR(**model_fields)``
    on inputs ``[B, *img_size, in_channels]``; ``skipped`` lists the MONAI keys that no forward
    pass uses (``norm_cross_attn``, ``cross_attn``).
  Raises:
    ValueError: not a UNETR state dict, a variant this model does not build, missing or
      unexpected keys, or wrong shapes (MONAI key names).
  """
  fields, in_channels = infer_unetr(state_dict, num_heads=num_heads, img_size=img_size)
  prefix = find_prefix(state_dict, POSITION_KEY, WHAT)
  expected = abstract_params(UNETR(**fields), (1, *fields["img_size"], in_channels))
  rules = _vit_rules(expected, fields)
  rules += [conv_stage_rule(path, shape) for path, shape in expected.items() if path[0] != "vit"]
  params, skipped = convert_by_rules(
    state_dict,
    prefix,
    rules,
    what=f"{WHAT} state dict",
    hint=(
      "The model builds UNETR with norm_name='instance' (no norm parameters), proj_type='conv' "
      "and a learned position embedding; norm layers with weights (batch norm, affine instance "
      "norm) or a perceptron patch embedding are not supported."
    ),
    expected=expected,
    ignorable=lambda key: bool(UNUSED_KEY.match(key)),
  )
  return {"params": params}, fields, skipped
