"""Mirai's cumulative probability layer: monotone per-year risk logits.

``logit[k] = base(x) + sum_{j <= k} relu(hazard(x))[j]``: non-negative yearly hazards are summed
over the years up to ``k`` (Mirai does this with an upper-triangular mask; a cumulative sum is the
same), so the risk of cancer within ``k + 1`` years never decreases with ``k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

_DENSE_AXES = ("embed", "mlp")


class CumulativeRiskHead(nn.Module):
  """``[B, D] -> [B, num_years]`` cumulative risk logits.

  Attributes:
    num_years: horizon (Mirai / BCRBench ``max_followup``: 5).
  """

  num_years: int = 5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    # Torch nn.Linear init: kaiming_uniform(a=sqrt(5)) == uniform(+-1/sqrt(fan_in)) == variance
    # scaling 1/3, fan_in, uniform.
    init = nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), _DENSE_AXES
    )
    hazards = nn.relu(
      nn.Dense(self.num_years, kernel_init=init, dtype=self.dtype, name="hazard_fc")(features)
    )
    base = nn.Dense(1, kernel_init=init, dtype=self.dtype, name="base_hazard_fc")(features)
    return jnp.cumsum(hazards, axis=-1) + base
