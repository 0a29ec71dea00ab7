"""Masked BCE risk loss: a hand-computed case, empty masks, head weights, padding, torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mammojax.losses.risk import DEFAULT_HEAD_WEIGHTS, masked_bce_with_logits, risk_loss


def _bce(x, y):
  return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_hand_computed_case():
  logits = jnp.array([[0.0, 2.0], [-1.0, 3.0]])
  target = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])  # the last entry is censored
  expected = (math.log(2.0) + math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0))) / 3
  assert expected == pytest.approx((_bce(0, 1) + _bce(2, 0) + _bce(-1, 0)) / 3)
  assert float(masked_bce_with_logits(logits, target, mask)) == pytest.approx(expected, rel=1e-6)


def test_empty_mask_gives_zero_and_finite_gradient():
  zeros = jnp.zeros((2, 3))
  value, grad = jax.value_and_grad(masked_bce_with_logits)(jnp.ones((2, 3)), zeros, zeros)
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_head_weights_padding_and_shape_errors():
  rng = np.random.default_rng(0)
  heads = {
    name: (
      jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
      jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32),
      jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32),
    )
    for name in ("fused", "cur", "pri", "extra")
  }
  total, per_head = risk_loss(heads)
  assert DEFAULT_HEAD_WEIGHTS == {"fused": 1.0, "cur": 0.2, "pri": 0.2}
  expected = (
    per_head["fused"] + 0.2 * per_head["cur"] + 0.2 * per_head["pri"] + per_head["extra"]
  )  # unlisted heads weigh 1.0, as in BCRBench
  assert float(total) == pytest.approx(float(expected), rel=1e-6)
  total_w, _ = risk_loss(heads, {"fused": 2.0, "cur": 0.0, "pri": 0.0, "extra": 0.0})
  assert float(total_w) == pytest.approx(2 * float(per_head["fused"]), rel=1e-6)

  valid = jnp.array([1.0, 1.0, 0.0])
  _, padded = risk_loss(heads, valid=valid)
  trimmed = {k: tuple(a[:2] for a in v) for k, v in heads.items()}
  _, reference = risk_loss(trimmed)
  for name in heads:
    assert float(padded[name]) == pytest.approx(float(reference[name]), rel=1e-6)

  with pytest.raises(ValueError, match="one shape"):
    masked_bce_with_logits(jnp.zeros((2, 5)), jnp.zeros((2, 4)), jnp.zeros((2, 5)))


def test_matches_torch_weighted_sum_over_mask_count():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  logits, target = rng.normal(size=(4, 5)) * 3, rng.integers(0, 2, (4, 5))
  mask = rng.integers(0, 2, (4, 5))
  expected = (
    torch.nn.functional.binary_cross_entropy_with_logits(
      torch.tensor(logits),
      torch.tensor(target, dtype=torch.float64),
      weight=torch.tensor(mask, dtype=torch.float64),
      reduction="sum",
    )
    / mask.sum()
  )
  ours = masked_bce_with_logits(
    jnp.asarray(logits, jnp.float32), jnp.asarray(target), jnp.asarray(mask)
  )
  assert float(ours) == pytest.approx(float(expected), rel=1e-5)
