"""BCRBench ImgFeatAlign state dict -> :class:`mammojax.models.imgfeatalign.ImgFeatAlign` variables.

BCRBench saves ``model.state_dict()`` (possibly inside ``{'model': ...}`` and with ``module.``
prefixes, which are stripped here as BCRBench does). Its keys:

* ``encoder.{0..8}.*``: the Mirai ResNet-18 as an ``nn.Sequential`` (see ``convert.mirai``);
* ``mammo_reg_net.*``: MammoRegNet, converted by ``convert.mammoregnet.import_mammoregnet``;
* ``risk_model.positional_encoding.pe`` (a fixed sinusoid table, checked, not stored),
  ``risk_model.attention_layer.{attn.in_proj_*, attn.out_proj.*, norm1.*, norm2.*, ff.0.*,
  ff.2.*}``, ``risk_model.feature_projection.*``, ``risk_model.head_{fused,cur,pri}.{hazard_fc,
  base_hazard_fc}.*`` and their constant ``triangular_mask`` (checked, not stored).

The attention head count is not recorded in the weights: pass the one the model was trained with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mammojax.convert.layouts import torch_attention_params, torch_dense_kernel
from mammojax.convert.mirai import find_backbone, import_backbone
from mammojax.nn.time_encoding import sinusoid_table

_HEADS = ("head_fused", "head_cur", "head_pri")


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes DataParallel/DDP ``module.`` prefixes (BCRBench strips every occurrence)."""
  return {key.replace("module.", ""): value for key, value in state_dict.items()}


def infer_hparams(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """ImgFeatAlign fields that the weights determine: num_years, encoder_width, ffn_expansion,
  time_steps."""
  state_dict = strip_module_prefix(state_dict)
  try:
    dim = state_dict["risk_model.feature_projection.weight"].shape[0]
    return {
      "num_years": int(state_dict["risk_model.head_fused.hazard_fc.weight"].shape[0]),
      "encoder_width": int(state_dict["encoder.0.conv1.weight"].shape[0]),
      "ffn_expansion": int(state_dict["risk_model.attention_layer.ff.0.weight"].shape[0] // dim),
      "time_steps": int(state_dict["risk_model.positional_encoding.pe"].shape[0]),
    }
  except KeyError as e:
    raise ValueError(f"not a BCRBench ImgFeatAlign state dict: key {e} missing") from e


def _attention(take, prefix: str, num_heads: int) -> dict[str, Any]:
  return torch_attention_params(
    take(f"{prefix}in_proj_weight"),
    take(f"{prefix}in_proj_bias"),
    take(f"{prefix}out_proj.weight"),
    take(f"{prefix}out_proj.bias"),
    num_heads,
    name=f"{prefix}in_proj_weight",
  )


def import_risk_model(
  state_dict: Mapping[str, Any], *, num_heads: int, max_time: float, prefix: str = "risk_model."
) -> tuple[dict[str, Any], set[str]]:
  """BCRBench ``RiskModelWithAttention`` weights -> ``AttentionRiskFusion`` params, consumed keys."""
  consumed: set[str] = set()

  def take(key: str) -> np.ndarray:
    if key not in state_dict:
      raise KeyError(f"ImgFeatAlign weight {key!r} missing from the state dict")
    consumed.add(key)
    return np.array(state_dict[key], dtype=np.float32)  # a copy: never alias torch memory

  def dense(name: str) -> dict[str, np.ndarray]:
    return {"kernel": torch_dense_kernel(take(f"{name}.weight")), "bias": take(f"{name}.bias")}

  def layer_norm(name: str) -> dict[str, np.ndarray]:
    return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}

  table = take(f"{prefix}positional_encoding.pe")
  expected = sinusoid_table(table.shape[1], max_time, table.shape[0])
  if not np.allclose(table, expected, atol=1e-4):
    raise ValueError(
      f"{prefix}positional_encoding.pe differs from the sinusoid table over "
      f"[0, {max_time}] with {table.shape[0]} steps; pass the max_time the model "
      "was built with (--max_time)"
    )
  attention = f"{prefix}attention_layer."
  params: dict[str, Any] = {
    "attention": {
      "attn": _attention(take, f"{attention}attn.", num_heads),
      "norm1": layer_norm(f"{attention}norm1"),
      "norm2": layer_norm(f"{attention}norm2"),
      "ff_in": dense(f"{attention}ff.0"),
      "ff_out": dense(f"{attention}ff.2"),
    },
    "feature_projection": dense(f"{prefix}feature_projection"),
  }
  for head in _HEADS:
    mask = take(f"{prefix}{head}.triangular_mask")
    if not np.array_equal(mask, np.triu(np.ones_like(mask))):
      raise ValueError(f"{prefix}{head}.triangular_mask is not upper-triangular ones")
    params[head] = {
      "hazard_fc": dense(f"{prefix}{head}.hazard_fc"),
      "base_hazard_fc": dense(f"{prefix}{head}.base_hazard_fc"),
    }
  return params, consumed


def import_imgfeatalign(
  state_dict: Mapping[str, Any],
  *,
  num_heads: int = 8,
  max_time: float = 5.0,
  registration_hparams: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """A BCRBench ImgFeatAlign state dict (numpy arrays) -> ``{'params', 'batch_stats'}``.

  Args:
    state_dict: torch names -> numpy arrays (``module.`` prefixes allowed).
    num_heads: attention heads of the trained model (BCRBench: 8).
    max_time: time-encoding range in years (BCRBench: 5.0), checked against the stored table.
    registration_hparams: keyword arguments for ``import_mammoregnet`` (MammoRegNet sizes).
  Raises:
    ValueError / KeyError naming any missing, malformed or unexpected key.
  """
  # Imported here: the MammoRegNet importer is a sibling module that is optional for the rest.
  from mammojax.convert.mammoregnet import import_mammoregnet

  state_dict = strip_module_prefix(state_dict)
  prefixes, _ = find_backbone({k: v for k, v in state_dict.items() if k.startswith("encoder.")})
  encoder, consumed = import_backbone(state_dict, prefixes)
  risk_params, risk_consumed = import_risk_model(state_dict, num_heads=num_heads, max_time=max_time)
  consumed |= risk_consumed
  registration_keys = {k for k in state_dict if k.startswith("mammo_reg_net.")}
  if not registration_keys:
    raise KeyError("no 'mammo_reg_net.*' keys: the state dict lacks the registration network")
  registration = import_mammoregnet(
    {k[len("mammo_reg_net.") :]: state_dict[k] for k in registration_keys},
    **dict(registration_hparams or {}),
  )
  consumed |= registration_keys
  unexpected = sorted(set(state_dict) - consumed)
  if unexpected:
    raise ValueError(
      f"{len(unexpected)} unexpected keys in the ImgFeatAlign state dict (not an "
      f"ImgFeatAlign checkpoint, or a different version): {unexpected[:10]}"
    )
  return {
    "params": {
      "encoder": encoder["params"],
      "registration": registration["params"],
      "risk_model": risk_params,
    },
    "batch_stats": {"encoder": encoder["batch_stats"]},
  }
