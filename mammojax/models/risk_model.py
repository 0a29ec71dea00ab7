"""What the risk trainer needs from any cumulative-risk model (BCRBench's ``BaseRiskModel``).

A risk model's ``__call__`` returns a dict of outputs; these two methods turn it into loss terms
and into the evaluation score, so the loss (``mammojax.losses.risk``) and the metrics never need
to know the model. They read only ``outputs`` and ``batch``, so they work on an unbound module.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax

from mammojax.losses.risk import RiskHeads


class RiskModel(abc.ABC):
  """Mixin for Flax modules that predict cumulative risk (``class M(nn.Module, RiskModel)``)."""

  @abc.abstractmethod
  def risk_heads(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> RiskHeads:
    """``{head: (logits [B, Y], target [B, Y], mask [B, Y])}`` for every supervised head."""

  @abc.abstractmethod
  def primary_risk(self, outputs: Mapping[str, Any]) -> jax.Array:
    """The evaluated risk, ``[B, Y]`` probabilities of cancer within 1..Y years."""
