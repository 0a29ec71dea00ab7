"""Mirai's cumulative probability layer: monotone per-year risk logits.

``logit[k] = base(x) + sum_{j <= k} relu(hazard(x))[j]``: non-negative yearly hazards are summed
over the years up to ``k`` (Mirai does this with an upper-triangular mask; a cumulative sum is the
same), so the risk of cancer within ``k + 1`` years never decreases with ``k``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mammojax.nn import initializers, partitioning


class CumulativeRiskHead(nn.Module):
  """``[B, D] -> [B, num_years]`` cumulative risk logits.

  Attributes:
    num_years: horizon (Mirai / BCRBench ``max_followup``: 5).
    activation: keeps the yearly hazards non-negative (ReLU, as Mirai); injectable so that an
      attribution method can change its gradient.
  """

  num_years: int = 5
  dtype: jnp.dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    dense = lambda width, name: partitioning.dense(  # noqa: E731
      width, name, kernel_init=initializers.torch_default_kernel, dtype=self.dtype
    )
    hazards = self.activation(dense(self.num_years, "hazard_fc")(features))
    base = dense(1, "base_hazard_fc")(features)
    return jnp.cumsum(hazards, axis=-1) + base
