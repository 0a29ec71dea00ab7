"""MONAI ``BasicUNet`` state dicts -> :class:`mammojax.models.segmentation.basic_unet.BasicUNet`.

Keys (after an optional prefix such as ``model.``, found from ``final_conv.weight``), for
``block`` in ``conv_0``, ``down_{1..4}.convs``, ``upcat_{1..4}.convs`` and ``j`` in 0, 1:

* ``{block}.conv_{j}.conv.{weight,bias}`` -> ``{block}/conv_{j}/conv/{kernel,bias}``;
* ``{block}.conv_{j}.adn.N.{weight,bias}`` (affine instance norm) -> ``.../norm/{scale,bias}``;
* ``upcat_{k}.upsample.deconv.{weight,bias}`` -> ``upcat_{k}/upsample/{kernel,bias}`` (a
  :class:`~mammojax.nn.conv_blocks.TransposedConvStride2`, kernel not flipped);
* ``final_conv.{weight,bias}`` -> ``final_conv/{kernel,bias}``.

The sizes (``features``, ``out_channels``, input channels, spatial dims, conv biases) are read
from the weights. Variants the model does not build (batch norm's running statistics, an instance
norm without affine parameters, ``upsample='pixelshuffle'``/``'nontrainable'``) fail with the
offending keys named.

The rule machinery (:class:`Rule`, :func:`convert_by_rules`, :func:`find_prefix`) is shared with
:mod:`mammojax.convert.unetr`: each rule reads one or more torch keys of known shapes and writes
Flax leaves, so that missing keys, unknown keys and wrong shapes are reported by their MONAI
names, all at once, before anything is converted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mammojax.convert.layouts import (
  torch_conv_kernel,
  torch_conv_kernel_shape,
  torch_transposed_conv_kernel,
  torch_transposed_conv_kernel_shape,
)
from mammojax.convert.torch_files import raise_if_mismatched
from mammojax.models.segmentation.basic_unet import SIZE_MULTIPLE, BasicUNet

Path = tuple[str, ...]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """Torch ``keys`` of ``shapes`` (prefix-free) -> Flax leaves ``paths`` via ``convert``."""

  keys: tuple[str, ...]
  shapes: tuple[Shape, ...]
  paths: tuple[Path, ...]
  convert: Callable[..., Sequence[np.ndarray]]


def copy_rule(key: str, path: Path, shape: Shape) -> Rule:
  """A tensor that keeps its shape (biases, norm scales, position embeddings)."""
  return Rule((key,), (tuple(shape),), (path,), lambda value: (value,))


def conv_rule(key: str, path: Path, shape: Shape) -> Rule:
  """A torch conv weight ``[O, I, *k]`` -> a Flax kernel ``shape`` = ``[*k, I, O]``."""
  return Rule((key,), (torch_conv_kernel_shape(shape),), (path,), lambda w: (torch_conv_kernel(w),))


def transposed_conv_rule(key: str, path: Path, shape: Shape) -> Rule:
  """A torch transposed-conv weight ``[I, O, *k]`` -> ``[*k, I, O]`` for
  :class:`~mammojax.nn.conv_blocks.TransposedConvStride2` (taps in torch's order, no flip)."""
  return Rule(
    (key,),
    (torch_transposed_conv_kernel_shape(shape),),
    (path,),
    lambda w: (torch_transposed_conv_kernel(w),),
  )


def find_prefix(keys: Iterable[str], anchor: str, what: str) -> str:
  """The prefix (``''``, ``'model.'``, ...) before ``anchor``, a key every such state dict has."""
  keys = list(keys)
  found = [
    key[: len(key) - len(anchor)] for key in keys if key == anchor or key.endswith(f".{anchor}")
  ]
  if len(found) != 1:
    raise ValueError(
      f"not a {what} state dict: {len(found)} keys end with {anchor!r} (expected one) among "
      f"{len(keys)} keys (first: {keys[:5]})"
    )
  return found[0]


def convert_by_rules(
  state_dict: Mapping[str, Any],
  prefix: str,
  rules: Sequence[Rule],
  *,
  what: str,
  hint: str,
  expected: Mapping[Path, Shape],
  ignorable: Callable[[str], bool] = lambda key: False,
) -> tuple[dict[str, Any], list[str]]:
  """Applies ``rules`` to ``state_dict`` (keys under ``prefix``); ``expected`` is the model's
  ``{flat param path: shape}`` (:func:`abstract_params`), which the rules must fill exactly.

  Returns:
    ``(params, ignored)``: the nested float32 Flax params and the sorted full keys that
    ``ignorable`` accepted (weights the model does not use).
  Raises:
    ValueError: naming every missing key, unexpected key and wrong shape (torch shapes).
  """
  wanted = {key for rule in rules for key in rule.keys}
  present = {key[len(prefix) :]: key for key in state_dict if key.startswith(prefix)}
  missing = sorted(prefix + key for key in wanted if key not in present)
  mismatched = [
    f"{prefix + key}: {tuple(np.shape(state_dict[present[key]]))} != expected {shape}"
    for rule in rules
    for key, shape in zip(rule.keys, rule.shapes)
    if key in present and tuple(np.shape(state_dict[present[key]])) != tuple(shape)
  ]
  leftovers = sorted(set(state_dict) - {present[key] for key in wanted if key in present})
  ignored = [key for key in leftovers if key.startswith(prefix) and ignorable(key[len(prefix) :])]
  unexpected = [key for key in leftovers if key not in ignored]
  raise_if_mismatched(what, missing, unexpected, mismatched, hint)
  flat: dict[Path, np.ndarray] = {}
  for rule in rules:
    # np.array copies: the result never aliases the caller's (torch-owned) buffers.
    values = [np.array(state_dict[present[key]], dtype=np.float32) for key in rule.keys]
    for path, value in zip(rule.paths, rule.convert(*values)):
      flat[path] = np.ascontiguousarray(value, dtype=np.float32)
  wrong = sorted(
    "/".join(path)
    for path in set(flat) | set(expected)
    if path not in flat or path not in expected or flat[path].shape != tuple(expected[path])
  )
  if wrong:  # the rules themselves disagree with the model: a bug here, not in the file
    raise AssertionError(f"conversion rules do not fill the model's parameters: {wrong[:10]}")
  return traverse_util.unflatten_dict(flat), ignored


def abstract_params(model: nn.Module, *input_shapes: Shape) -> dict[Path, Shape]:
  """``{flat param path: shape}`` of ``model`` called on zeros of ``input_shapes`` (one per
  positional input, e.g. ``[B, *S, C]``), without allocating."""
  inputs = [jnp.zeros(shape, jnp.float32) for shape in input_shapes]
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def shape_of(state_dict: Mapping[str, Any], key: str, what: str) -> Shape:
  """The shape of ``state_dict[key]``, or a ValueError naming the missing key."""
  if key not in state_dict:
    raise ValueError(f"{what} weight {key!r} missing from the state dict")
  return tuple(np.shape(state_dict[key]))


def basic_unet_rule(path: Path, shape: Shape) -> Rule:
  """The rule of one BasicUNet parameter (module docstring); paths relative to a lone
  ``TwoConv`` / ``UpCat`` work alike."""
  *module, leaf = path
  torch_leaf = "bias" if leaf == "bias" else "weight"
  if module[-1] == "norm":  # AffineInstanceNorm -> ADN's N
    return copy_rule(".".join([*module[:-1], "adn", "N", torch_leaf]), path, shape)
  if module[-1] == "upsample":  # TransposedConvStride2 -> UpSample's deconv
    key = ".".join([*module, "deconv", torch_leaf])
    if leaf == "kernel":
      return transposed_conv_rule(key, path, shape)
    return copy_rule(key, path, shape)
  key = ".".join([*module, torch_leaf])
  return conv_rule(key, path, shape) if leaf == "kernel" else copy_rule(key, path, shape)


def import_basic_unet(
  state_dict: Mapping[str, Any], *, spatial_dims: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A MONAI ``BasicUNet`` state dict -> ``BasicUNet`` variables and model fields.

  Args:
    state_dict: torch names -> numpy arrays (or array-likes), optionally under one prefix.
    spatial_dims: when given, the weights must be of a network with that many spatial dims.
  Returns:
    ``({'params': ...}, model_fields)``: float32 params for ``BasicUNet(**model_fields)``;
    ``model_fields`` holds ``out_channels``, ``features`` (six ints) and ``bias``; the input
    has ``in_channels`` = the first conv's input channels (``infer_basic_unet`` gives both).
  Raises:
    ValueError: not a BasicUNet state dict, the wrong spatial dims, a variant this model does
      not build, missing / unexpected keys or wrong shapes (named).
  """
  fields, in_channels, dims = infer_basic_unet(state_dict)
  if spatial_dims is not None and dims != spatial_dims:
    raise ValueError(
      f"the BasicUNet weights are {dims}-D (conv weights with {dims} kernel axes), not "
      f"{spatial_dims}-D"
    )
  prefix = find_prefix(state_dict, "final_conv.weight", "MONAI BasicUNet")
  expected = abstract_params(BasicUNet(**fields), (1, *(SIZE_MULTIPLE,) * dims, in_channels))
  rules = [basic_unet_rule(path, shape) for path, shape in expected.items()]
  params, _ = convert_by_rules(
    state_dict,
    prefix,
    rules,
    what="MONAI BasicUNet state dict",
    expected=expected,
    hint=(
      "The model builds BasicUNet with an affine instance norm (MONAI's default norm=('instance', "
      "{'affine': True})) and upsample='deconv'; batch norm or other upsampling modes are not "
      "supported."
    ),
  )
  return {"params": params}, fields


def infer_basic_unet(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
  """``(model_fields, in_channels, spatial_dims)`` read from a MONAI BasicUNet state dict."""
  prefix = find_prefix(state_dict, "final_conv.weight", "MONAI BasicUNet")
  what = "MONAI BasicUNet"
  first = shape_of(state_dict, f"{prefix}conv_0.conv_0.conv.weight", what)
  final = shape_of(state_dict, f"{prefix}final_conv.weight", what)
  if len(first) < 3 or len(final) != len(first):
    raise ValueError(
      f"{prefix}conv_0.conv_0.conv.weight {first} and {prefix}final_conv.weight {final} are not "
      "conv weights [out, in, *kernel] of the same rank"
    )
  heads = [
    f"{prefix}{unit}.conv_0.conv.weight"
    if unit == "conv_0"
    else f"{prefix}{unit}.convs.conv_0.conv.weight"
    for unit in ("conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_1")
  ]
  features = [int(shape_of(state_dict, key, what)[0]) for key in heads]
  fields = {
    "out_channels": int(final[0]),
    "features": tuple(features),
    "bias": f"{prefix}conv_0.conv_0.conv.bias" in state_dict,
  }
  return fields, int(first[1]), len(first) - 2
