"""PyTorch MammoRegNet checkpoint -> Flax variables of :class:`MammoRegNet`.

Module names are shared (``Encoder.conv_1.Conv_1`` -> ``Encoder/conv_1/Conv_1``, ``blocks.0`` ->
``blocks_0``); weights are re-laid out for channels-last Flax:

- Conv2d ``weight [O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]``
- ConvTranspose2d (``up_conv``) ``weight [I, O, 2, 2]`` -> ``kernel [2, 2, I, O]``
- Linear ``weight [O, I]`` -> ``kernel [I, O]``; LayerNorm ``weight`` -> ``scale``
- ``relative_position_bias_table`` as is; the ``relative_position_index`` buffers are
  recomputed by the model, so they are only checked against it when present.

The flow needs no conversion: the reference's ``[B, 2, H, W]`` pixel flow with channel 0 = rows
is our ``[B, H, W, 2]`` 'ij' flow transposed (see ``mammojax.models.registration.mammoregnet``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mammojax.convert import layouts
from mammojax.convert.torch_files import raise_if_mismatched, unwrap_state_dict
from mammojax.models.registration.mammoregnet import SIZE_MULTIPLE, MammoRegNet
from mammojax.nn.swin import relative_position_index

_INDEX_BUFFER = "relative_position_index"


def import_mammoregnet(state_dict: Mapping[str, Any], **hparams: Any) -> dict[str, Any]:
  """Converts a MammoRegNet state dict to ``{'params': ...}`` for ``MammoRegNet(**hparams)``.

  Args:
    state_dict: ``{name: array}`` (numpy or torch tensors), possibly nested under 'state_dict' /
      'model' and with ``module.`` prefixes (see :func:`unwrap_state_dict`).
    **hparams: :class:`MammoRegNet` fields the checkpoint was trained with (defaults are the
      reference's).
  Returns:
    Flax variables ``{'params': nested dict of float32 numpy arrays}``.
  Raises:
    ValueError: naming every missing key, unexpected key and shape mismatch.
  """
  fields = {f.name for f in dataclasses.fields(MammoRegNet)} - {"parent", "name"}
  unknown = sorted(set(hparams) - fields)
  if unknown:
    raise ValueError(f"unknown MammoRegNet hyper-parameters {unknown}; valid: {sorted(fields)}")
  model = MammoRegNet(**hparams)
  state = unwrap_state_dict(state_dict)

  image = jax.ShapeDtypeStruct((1, SIZE_MULTIPLE, SIZE_MULTIPLE, model.in_channels), jnp.float32)
  abstract = jax.eval_shape(
    lambda rng, x: model.init(rng, moving=x, fixed=x), jax.random.key(0), image
  )
  expected = traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"])

  params, missing, mismatched = {}, [], []
  used, index_buffers = set(), set()
  for path, leaf in expected.items():
    key, to_flax, torch_shape = _torch_entry(path, leaf.shape)
    if path[-1] == "relative_position_bias_table":
      index_buffers.add(key.replace(path[-1], _INDEX_BUFFER))
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state[key])
    if value.shape != torch_shape:
      mismatched.append(f"{key}: checkpoint {value.shape}, model expects {torch_shape}")
      continue
    params[path] = to_flax(value).astype(np.float32)

  unexpected = []
  for key in sorted(set(state) - used):
    if key in index_buffers:
      _check_index_buffer(key, state[key], model, mismatched)
    else:
      unexpected.append(key)

  settings = {
    f: getattr(model, f)
    for f in ("in_channels", "enc_channels", "dec_channels", "num_layers", "window_size")
  }
  raise_if_mismatched(
    f"MammoRegNet checkpoint (model {settings})",
    missing,
    unexpected,
    mismatched,
    "Pass the hyper-parameters it was trained with.",
  )
  return {"params": traverse_util.unflatten_dict(params)}


def _torch_entry(path: tuple[str, ...], shape: tuple[int, ...]):
  """Torch key, converter to the Flax layout, and the torch shape of the Flax leaf at ``path``."""
  modules = [p.replace("blocks_", "blocks.") if p.startswith("blocks_") else p for p in path[:-1]]
  leaf = path[-1]
  name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  key = ".".join(modules + [name])
  if leaf == "kernel" and len(shape) == 4 and path[-2] == "up_conv":
    # TransposedConvStride2 paints with the kernel as torch does: no flip.
    return (
      key,
      layouts.torch_transposed_conv_kernel,
      layouts.torch_transposed_conv_kernel_shape(shape),
    )
  if leaf == "kernel" and len(shape) == 4:
    return key, layouts.torch_conv_kernel, layouts.torch_conv_kernel_shape(shape)
  if leaf == "kernel" and len(shape) == 2:
    return key, layouts.torch_dense_kernel, layouts.torch_dense_kernel_shape(shape)
  return key, lambda w: w, tuple(shape)


def _check_index_buffer(key: str, value: Any, model: MammoRegNet, errors: list[str]) -> None:
  """Adds an error unless ``value`` is the index the model computes for its window."""
  index = relative_position_index(model.window_size)
  value = np.asarray(value)
  if value.shape != index.shape or not np.array_equal(value, index):
    errors.append(
      f"{key}: checkpoint buffer {value.shape} differs from the relative position "
      f"index of window_size={tuple(model.window_size)} {index.shape}"
    )
