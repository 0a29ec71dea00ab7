r"""Import ICON / GradICON / uniGradICON torch weights into Flax registration modules.

ICON networks are trees of wrappers (``icon_registration.network_wrappers``) around ``UNet2``
displacement networks (``networks.tallUNet2``). The state dict keys spell the tree:
``netPhi`` / ``netPsi`` are the two steps of a ``TwoStepRegistration``, ``net`` the child of a
``DownsampleRegistration`` or a ``FunctionFromVectorField``, and a ``FunctionFromVectorField``'s
``net`` is the U-Net (``downConvs.i``, ``upConvs.i``, ``batchNorms.i``, ``lastConv``). Loss
wrappers add a ``regis_net.`` prefix; every level registers an ``identity_map`` buffer (not
weights; skipped). :func:`build_icon_registration` rebuilds the same tree from
``mammojax.models.registration.icon`` modules (``netPhi`` -> ``first``, ``netPsi`` ->
``second``) with :class:`~mammojax.models.registration.icon_unet.ICONUNet2` leaves, and
:func:`import_icon_registration` maps the weights onto it.

  python -m mammojax.convert icon unigradicon.pth --out=/tmp/unigradicon --input_shape=175,175,175
  python -m mammojax.register --fixed a.nii.gz --moving b.nii.gz --out /tmp/r --model /tmp/unigradicon

Layout conversions: conv kernels ``[out, in, *k]`` -> ``[*k, in, out]``; transposed-conv kernels
``[in, out, *k]`` -> ``[*k, in, out]`` spatially flipped (Flax's ``ConvTranspose`` does not flip);
BatchNorm ``weight/bias`` -> ``scale/bias`` params and ``running_mean/var`` -> ``batch_stats``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mammojax.convert.layouts import torch_conv_kernel, torch_transposed_conv_kernel
from mammojax.models.registration import icon
from mammojax.models.registration.icon_unet import ICONUNet2

_UNET_MARKER = "downConvs.0.weight"
_WRAPPER_PREFIX = "regis_net."


def build_icon_network(fields: Mapping[str, Any]) -> icon.RegistrationModule:
  """The Flax registration module described by :func:`describe_icon_tree`'s output."""
  kind = fields["kind"]
  if kind == "unet":
    return icon.FunctionFromVectorField(
      ICONUNet2(tuple(fields["down_features"]), tuple(fields["up_features"]))
    )
  if kind == "two_step":
    return icon.TwoStepRegistration(
      build_icon_network(fields["first"]), build_icon_network(fields["second"])
    )
  if kind == "downsample":
    return icon.DownsampleRegistration(build_icon_network(fields["net"]))
  raise ValueError(f"unknown ICON tree node kind {kind!r}")


def build_icon_registration(state_dict: Mapping[str, Any]) -> icon.RegistrationModule:
  """The Flax module tree matching an ICON state dict (see the module docstring)."""
  return build_icon_network(describe_icon_tree(state_dict))


def describe_icon_tree(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON-able description of the wrapper tree and U-Net sizes in an ICON state dict."""
  keys = _strip_wrapper(state_dict)
  if not any(k.endswith(_UNET_MARKER) for k in keys):
    raise ValueError(
      "not an ICON UNet2 state dict: no '...downConvs.0.weight' key (expected "
      "tallUNet2 weights, e.g. from GradICON or uniGradICON)"
    )
  return _describe(keys, "")


def _describe(keys: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  if prefix + _UNET_MARKER in keys:  # A bare U-Net (the whole dict is one network).
    return _describe_unet(keys, prefix)
  if prefix + "net." + _UNET_MARKER in keys:  # FunctionFromVectorField(UNet2).
    return _describe_unet(keys, prefix + "net.")
  if any(k.startswith(prefix + "netPhi.") for k in keys):
    return {
      "kind": "two_step",
      "first": _describe(keys, prefix + "netPhi."),
      "second": _describe(keys, prefix + "netPsi."),
    }
  if any(k.startswith(prefix + "net.") for k in keys):
    return {"kind": "downsample", "net": _describe(keys, prefix + "net.")}
  raise ValueError(
    f"cannot interpret the ICON wrapper at {prefix!r}: keys there are "
    f"{sorted(k for k in keys if k.startswith(prefix))[:5]}"
  )


def _describe_unet(keys: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  num_layers = 0
  while f"{prefix}downConvs.{num_layers}.weight" in keys:
    num_layers += 1
  down = [int(np.shape(keys[f"{prefix}downConvs.0.weight"])[1])]
  down += [int(np.shape(keys[f"{prefix}downConvs.{d}.weight"])[0]) for d in range(num_layers)]
  up = [int(np.shape(keys[f"{prefix}upConvs.{d}.weight"])[1]) for d in range(num_layers)]
  return {
    "kind": "unet",
    "prefix": prefix,
    "down_features": down,
    "up_features": up,
    "num_spatial": int(np.ndim(keys[f"{prefix}downConvs.0.weight"])) - 2,
  }


def import_icon_registration(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Flax variables ``{'params', 'batch_stats'}`` for :func:`build_icon_registration`'s module.

  Raises:
    ValueError: a key is neither consumed nor a known buffer, or a weight has the wrong shape.
  """
  keys = _strip_wrapper(state_dict)
  tree = describe_icon_tree(state_dict)
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  used: set[str] = set()
  _import_node(keys, tree, params, stats, used)
  leftover = sorted(k for k in keys if k not in used and not _is_buffer(k))
  if leftover:
    raise ValueError(f"state dict entries not used by the ICON UNet2 tree: {leftover[:8]}")
  return {"params": params, "batch_stats": stats}


def _import_node(keys, node, params, stats, used) -> None:
  if node["kind"] == "two_step":
    for torch_name, flax_name in (("first", "first"), ("second", "second")):
      params[flax_name], stats[flax_name] = {}, {}
      _import_node(keys, node[torch_name], params[flax_name], stats[flax_name], used)
  elif node["kind"] == "downsample":
    params["net"], stats["net"] = {}, {}
    _import_node(keys, node["net"], params["net"], stats["net"], used)
  else:
    unet_params, unet_stats = import_unet2(keys, node["prefix"], len(node["up_features"]), used)
    params["net"], stats["net"] = unet_params, unet_stats


def import_unet2(
  keys: Mapping[str, Any], prefix: str, num_layers: int, used: set[str] | None = None
) -> tuple[dict, dict]:
  """``(params, batch_stats)`` of one :class:`ICONUNet2` from ``prefix``-ed UNet2 weights."""
  used = set() if used is None else used

  def take(name):
    key = prefix + name
    if key not in keys:
      raise ValueError(f"missing {key!r} in the ICON state dict")
    used.add(key)
    return np.asarray(keys[key], np.float32)

  params, stats = {}, {}
  for d in range(num_layers):
    params[f"downConvs_{d}"] = {
      "kernel": torch_conv_kernel(take(f"downConvs.{d}.weight")),
      "bias": take(f"downConvs.{d}.bias"),
    }
    # Flax's ConvTranspose does not flip its kernel; torch's transposed convolution does.
    kernel = torch_transposed_conv_kernel(take(f"upConvs.{d}.weight"), flip=True)
    params[f"upConvs_{d}"] = {
      "kernel": np.ascontiguousarray(kernel),
      "bias": take(f"upConvs.{d}.bias"),
    }
    params[f"batchNorms_{d}"] = {
      "scale": take(f"batchNorms.{d}.weight"),
      "bias": take(f"batchNorms.{d}.bias"),
    }
    stats[f"batchNorms_{d}"] = {
      "mean": take(f"batchNorms.{d}.running_mean"),
      "var": take(f"batchNorms.{d}.running_var"),
    }
  params["lastConv"] = {
    "kernel": torch_conv_kernel(take("lastConv.weight")),
    "bias": take("lastConv.bias"),
  }
  return params, stats


def _strip_wrapper(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  keys = dict(state_dict)
  if keys and all(k.startswith(_WRAPPER_PREFIX) or _is_buffer(k) for k in keys):
    keys = {
      k[len(_WRAPPER_PREFIX) :] if k.startswith(_WRAPPER_PREFIX) else k: v for k, v in keys.items()
    }
  return keys


def _is_buffer(key: str) -> bool:
  """Non-weight entries ICON modules register: identity maps and BatchNorm step counters."""
  return bool(re.search(r"(^|\.)identity_map$|\.num_batches_tracked$", key))
