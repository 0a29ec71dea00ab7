"""From a pretrained AMAE encoder to the segmentation networks' weights.

* Adaptive UNETR takes the encoder as it is (its ``encoder`` subtree); only the per-contrast rows
  (the tokenizer's projector and the modality embedding) are picked by contrast name, so the
  fine-tuning vocabulary may be a subset of the pretraining one, in any order
  (:func:`select_contrasts`).
* Plain UNETR (the seed's second route: contrasts concatenated as channels, zeros for a missing
  one) takes the blocks and final norm unchanged, and a multi-channel patch embedding built from
  the per-contrast filters (:func:`unetr_vit_params`): its kernel for input channel ``c`` is
  contrast ``c``'s effective filter ``W_c / C`` and its bias the mean over the ``C`` channels of
  ``b_c`` plus the contrast's modality embedding. So its token at a location is the mean of the
  per-contrast tokens the encoder was pretrained on (position added once, as the encoder adds it
  to each), and every pretrained weight is used. The fixed sin-cos position table becomes the
  initial value of UNETR's learned ``pos_embedding`` (as SelfMedMAE loads its MAE's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mammojax.nn.dynamic_tokenizer import slot_filters
from mammojax.nn.vit import sincos_position_embedding


def _contrast_rows(
  source_contrasts: Sequence[str], contrasts: Sequence[str], source: str
) -> list[int]:
  missing = [c for c in contrasts if c not in source_contrasts]
  if missing:
    raise ValueError(
      f"{source} was pretrained on the contrasts {list(source_contrasts)}, without {missing}: "
      "fine-tune on those it knows (data.contrasts) or pretrain with them"
    )
  return [list(source_contrasts).index(c) for c in contrasts]


def select_contrasts(
  encoder: Mapping[str, Any],
  source_contrasts: Sequence[str],
  contrasts: Sequence[str],
  source: str = "the pretrained encoder",
) -> dict[str, Any]:
  """The encoder parameters for the slots ``contrasts`` (names) from those of a model with the
  slots ``source_contrasts``: the per-slot rows of ``tokenizer/projector/kernel`` ``[K, 2E]`` and
  ``modality_embedding`` ``[K, E]`` picked by name; every other leaf as it is."""
  rows = _contrast_rows(source_contrasts, contrasts, source)
  out = {k: v for k, v in encoder.items()}
  tokenizer = dict(encoder["tokenizer"])
  projector = dict(tokenizer["projector"])
  projector["kernel"] = np.asarray(projector["kernel"])[rows]
  tokenizer["projector"] = projector
  out["tokenizer"] = tokenizer
  if "modality_embedding" in encoder:
    out["modality_embedding"] = np.asarray(encoder["modality_embedding"])[rows]
  return out


def unetr_vit_params(
  encoder: Mapping[str, Any],
  source_contrasts: Sequence[str],
  contrasts: Sequence[str],
  *,
  update: str,
  position_embedding: str,
  grid: Sequence[int],
  source: str = "the pretrained encoder",
) -> dict[str, Any]:
  """UNETR's ``vit`` parameters (``conv_proj``, ``pos_embedding``, ``encoder_layer_{i}``,
  ``encoder_norm``) for input channels ``contrasts`` from a pretrained encoder (see the module
  docstring).

  Args:
    encoder: the encoder's parameters (an AMAE run's ``params/encoder``).
    source_contrasts: its slots' contrast names.
    contrasts: UNETR's input channels, in order.
    update: the tokenizer's update rule; position_embedding: the encoder's kind; grid: the patch
      grid (for a sin-cos table).
  """
  picked = select_contrasts(encoder, source_contrasts, contrasts, source)
  kernels, biases = (np.asarray(a) for a in slot_filters(picked["tokenizer"], update))
  channels = len(contrasts)
  kernel = np.concatenate([kernels[c] for c in range(channels)], axis=-2) / channels
  modality = picked.get("modality_embedding")
  per_channel = biases + (np.asarray(modality) if modality is not None else 0.0)
  out: dict[str, Any] = {
    "conv_proj": {"kernel": kernel, "bias": per_channel.mean(axis=0)},
  }
  if position_embedding == "learned":
    out["pos_embedding"] = np.asarray(picked["pos_embedding"])
  else:
    dim = kernel.shape[-1]
    out["pos_embedding"] = sincos_position_embedding(grid, dim, position_embedding)
  for name, value in picked.items():
    if name.startswith("encoder_layer_") or name == "encoder_norm":
      out[name] = value
  return out
