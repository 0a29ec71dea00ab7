"""Attribution over the visits of the temporal models: completeness, padding, image model, the
affine DNN, padding side."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from sequence_data import padded_sequences, to_start_padding

from mammojax.interpret import temporal as interpret_temporal
from mammojax.models import temporal

BATCH, LENGTH, DIM, CLASSES = 3, 4, 6, 3
LENGTHS = np.array([4, 1, 2])
TARGET = np.array([0, 2, 1])
SMALL = {
  "image": {},
  "dnn": {"hidden_dim": 16},
  "gru": {"hidden_dim": 16, "time_dim": 4},
  "transformer": {"model_dim": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32},
}


def _sequences(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return padded_sequences(LENGTHS, LENGTH, DIM, seed)


def _to_start_padding(array: np.ndarray) -> np.ndarray:
  return to_start_padding(array, LENGTHS)


@functools.cache
def _model(kind: str):
  """``(apply_fn, variables)`` of a small random model; the DNN gets non-trivial statistics."""
  features, mask, offsets = _sequences()
  model = temporal.build_temporal_model(kind, CLASSES, **SMALL[kind])
  variables = nn.meta.unbox(
    model.init(jax.random.key(1), jnp.asarray(features), mask, offsets, train=False)
  )
  if kind == "dnn":
    rng = np.random.default_rng(2)
    stats = variables["batch_stats"]["bn"]
    variables = {
      **variables,
      "batch_stats": {
        "bn": {
          "mean": jnp.asarray(rng.normal(size=stats["mean"].shape), jnp.float32),
          "var": jnp.asarray(rng.uniform(0.5, 2.0, size=stats["var"].shape), jnp.float32),
        }
      },
    }
  apply_fn = functools.partial(model.apply, variables, train=False)
  return apply_fn


@functools.cache
def _jitted(kind: str):
  """Both attributions of ``kind``'s model, jitted once (the tests share the compilation)."""
  apply_fn = _model(kind)

  @jax.jit
  def run(features, mask, offsets, target):
    ig = interpret_temporal.visit_integrated_gradients(apply_fn, features, mask, offsets, target)
    occlusion = interpret_temporal.visit_occlusion(apply_fn, features, mask, offsets, target)
    return ig, occlusion

  return run


def _both(kind: str, features, mask, offsets, target=TARGET):
  target = np.broadcast_to(np.asarray(target, np.int32), (BATCH,))
  return jax.tree.map(np.asarray, _jitted(kind)(features, mask, offsets, target))


@pytest.mark.parametrize("kind", ["image", "dnn", "gru", "transformer"])
def test_completeness_and_padding(kind):
  features, mask, offsets = _sequences()
  ig, occlusion = _both(kind, features, mask, offsets)
  assert ig.per_visit.shape == (BATCH, LENGTH) and ig.per_feature.shape == (BATCH, LENGTH, DIM)
  assert ig.delta.shape == (BATCH,) and occlusion.shape == (BATCH, LENGTH)
  np.testing.assert_allclose(ig.per_visit, ig.per_feature.sum(-1), rtol=1e-6, atol=1e-6)
  change = np.asarray(_model(kind)(features, mask, offsets))[np.arange(BATCH), TARGET]
  zeros = np.asarray(_model(kind)(np.zeros_like(features), mask, offsets))[np.arange(BATCH), TARGET]
  scale = np.maximum(1.0, np.abs(change - zeros))
  assert np.all(np.abs(ig.delta) < 1e-3 * scale), (ig.delta, change - zeros)
  padded = ~mask
  assert np.all(ig.per_visit[padded] == 0) and np.all(ig.per_feature[padded] == 0)
  assert np.all(occlusion[padded] == 0)
  if kind != "image":  # the image model reads the current visit alone (next test)
    assert np.all(np.abs(ig.per_visit[mask]) > 0)


def test_image_model_reads_only_the_current_visit():
  features, mask, offsets = _sequences()
  ig, occlusion = _both("image", features, mask, offsets)
  current = np.asarray(temporal.current_index(jnp.asarray(mask)))
  earlier = np.arange(LENGTH)[None] != current[:, None]
  assert np.all(ig.per_visit[earlier] == 0) and np.all(occlusion[earlier] == 0)
  assert np.all(ig.per_visit[np.arange(BATCH), current] != 0)
  # Linear: the current visit carries the whole logit change.
  np.testing.assert_allclose(ig.delta, 0, atol=1e-5)


def test_dnn_is_gradient_times_input_and_visit_contributions():
  features, mask, offsets = _sequences()
  apply_fn = _model("dnn")
  ig, _ = _both("dnn", features, mask, offsets)

  def logit(x):
    return jnp.sum(apply_fn(x, mask, offsets)[jnp.arange(BATCH), TARGET])

  gradient_x_input = np.asarray(jax.grad(logit)(jnp.asarray(features))) * features
  np.testing.assert_allclose(ig.per_feature, gradient_x_input, rtol=1e-5, atol=1e-6)
  # Affine: visit l's share of f(x) - f(0) is f(visit l alone) - f(0).
  base = np.asarray(apply_fn(np.zeros_like(features), mask, offsets))[np.arange(BATCH), TARGET]
  for position in range(LENGTH):
    alone = np.zeros_like(features)
    alone[:, position] = features[:, position]
    logits = np.asarray(apply_fn(alone, mask, offsets))[np.arange(BATCH), TARGET]
    np.testing.assert_allclose(ig.per_visit[:, position], logits - base, rtol=1e-4, atol=1e-5)


def test_gru_start_and_end_padding_agree():
  features, mask, offsets = _sequences()
  end_ig, end_occlusion = _both("gru", features, mask, offsets, target=1)
  start_ig, start_occlusion = _both(
    "gru", _to_start_padding(features), _to_start_padding(mask), _to_start_padding(offsets), 1
  )
  np.testing.assert_allclose(
    _to_start_padding(end_ig.per_visit), start_ig.per_visit, rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(
    _to_start_padding(end_occlusion), start_occlusion, rtol=1e-4, atol=1e-6
  )


def test_occlusion_matches_a_direct_removal():
  features, mask, offsets = _sequences()
  apply_fn = _model("transformer")
  _, occlusion = _both("transformer", features, mask, offsets)
  rows = np.arange(BATCH)
  full = np.asarray(jax.nn.softmax(apply_fn(features, mask, offsets)))[rows, TARGET]
  for position in range(LENGTH):
    removed_features, removed_mask = features.copy(), mask.copy()
    removed_features[:, position] = 0
    removed_mask[:, position] = False
    removed = np.asarray(jax.nn.softmax(apply_fn(removed_features, removed_mask, offsets)))
    expected = np.where(mask[:, position], full - removed[rows, TARGET], 0)
    np.testing.assert_allclose(occlusion[:, position], expected, rtol=1e-5, atol=1e-6)
