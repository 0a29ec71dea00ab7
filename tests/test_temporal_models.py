"""Temporal-GradCam sequence classifiers: torch parity, masking, padding side, builder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from sequence_data import padded_sequences, to_start_padding

from mammojax.models import temporal

BATCH, LENGTH, DIM = 4, 3, 8
LENGTHS = np.array([3, 1, 2, 2])


def _sequences(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return padded_sequences(LENGTHS, LENGTH, DIM, seed)


def _to_start_padding(array: np.ndarray) -> np.ndarray:
  return to_start_padding(array, LENGTHS)


def _apply(model, variables, features, mask, offsets):
  return np.asarray(
    model.apply(
      variables, jnp.asarray(features), jnp.asarray(mask), jnp.asarray(offsets), train=False
    )
  )


def _init(model, features, mask, offsets):
  return nn.meta.unbox(
    model.init(
      jax.random.key(0), jnp.asarray(features), jnp.asarray(mask), jnp.asarray(offsets), train=False
    )
  )


def test_current_index_start_and_end_padding():
  end = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
  start = np.array([[1, 1, 1], [0, 0, 1], [0, 1, 1]], bool)
  np.testing.assert_array_equal(temporal.current_index(jnp.asarray(end)), [2, 0, 1])
  np.testing.assert_array_equal(temporal.current_index(jnp.asarray(start)), [2, 2, 2])


def _torch_dnn(input_size: int, hidden: int, num_classes: int, dropout: float):
  """The reference DNN with num_layers=1, restated: Flatten -> Linear -> BN -> Dropout -> Linear."""
  return torch.nn.Sequential(
    torch.nn.Flatten(),
    torch.nn.Linear(input_size, hidden),
    torch.nn.BatchNorm1d(hidden),
    torch.nn.Dropout(dropout),
    torch.nn.Linear(hidden, num_classes),
  )


def _copy_dnn_weights(net) -> dict:
  linear_in, bn, _, projection = net[1], net[2], net[3], net[4]
  t = lambda p: p.detach().numpy().copy()  # noqa: E731 (torch updates BN stats in place)
  return {
    "params": {
      "input": {"kernel": t(linear_in.weight).T, "bias": t(linear_in.bias)},
      "bn": {"scale": t(bn.weight), "bias": t(bn.bias)},
      "projection": {"kernel": t(projection.weight).T, "bias": t(projection.bias)},
    },
    "batch_stats": {"bn": {"mean": t(bn.running_mean), "var": t(bn.running_var)}},
  }


def test_dnn_matches_torch_eval_and_train_statistics():
  torch.manual_seed(0)
  features, mask, offsets = _sequences()
  net = _torch_dnn(LENGTH * DIM, 16, 2, 0.1)
  with torch.no_grad():
    net[2].weight.uniform_(0.5, 1.5)
    net[2].bias.normal_()
    net[2].running_mean.normal_()
    net[2].running_var.uniform_(0.5, 2.0)
  model = temporal.TemporalDNN(hidden_dim=16, dropout_rate=0.1)
  variables = _copy_dnn_weights(net)
  init_shapes = jax.tree.map(jnp.shape, _init(model, features, mask, offsets))
  assert jax.tree.map(jnp.shape, variables) == init_shapes

  net.eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(features)).numpy()
  np.testing.assert_allclose(_apply(model, variables, features, mask, offsets), expected, atol=1e-5)

  # Train mode without dropout: batch statistics normalise, running stats follow torch's update.
  model = temporal.TemporalDNN(hidden_dim=16, dropout_rate=0.0)
  net[3].p = 0.0
  net.train()
  with torch.no_grad():
    expected = net(torch.from_numpy(features)).numpy()
  logits, updates = model.apply(
    variables, features, mask, offsets, train=True, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
  new_stats = updates["batch_stats"]["bn"]
  assert not np.allclose(new_stats["mean"], variables["batch_stats"]["bn"]["mean"])
  np.testing.assert_allclose(new_stats["mean"], net[2].running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(new_stats["var"], net[2].running_var.numpy(), atol=1e-6)


class _TorchDeepDNN(torch.nn.Module):
  """The reference's loop for num_layers > 1: ONE BatchNorm and dropout reused before each Linear."""

  def __init__(self, input_size: int, hidden: int, num_layers: int):
    super().__init__()
    self.input = torch.nn.Linear(input_size, hidden)
    self.bn = torch.nn.BatchNorm1d(hidden)
    self.layers = torch.nn.ModuleList(
      [torch.nn.Linear(hidden, hidden) for _ in range(num_layers - 1)]
    )
    self.projection = torch.nn.Linear(hidden, 2)

  def forward(self, x):
    x = self.input(torch.flatten(x, 1))
    for layer in self.layers:
      x = layer(self.bn(x))
    return self.projection(self.bn(x))


def test_dnn_extra_layers_share_one_batch_norm():
  torch.manual_seed(0)
  features, mask, offsets = _sequences()
  net = _TorchDeepDNN(LENGTH * DIM, 16, num_layers=3)
  t = lambda p: p.detach().numpy().copy()  # noqa: E731
  linear = lambda m: {"kernel": t(m.weight).T, "bias": t(m.bias)}  # noqa: E731
  variables = {
    "params": {
      "input": linear(net.input),
      "layers_0": linear(net.layers[0]),
      "layers_1": linear(net.layers[1]),
      "bn": {"scale": t(net.bn.weight), "bias": t(net.bn.bias)},
      "projection": linear(net.projection),
    },
    "batch_stats": {"bn": {"mean": t(net.bn.running_mean), "var": t(net.bn.running_var)}},
  }
  model = temporal.TemporalDNN(hidden_dim=16, num_layers=3, dropout_rate=0.0)
  init_shapes = jax.tree.map(jnp.shape, _init(model, features, mask, offsets))
  assert jax.tree.map(jnp.shape, variables) == init_shapes

  net.train()
  with torch.no_grad():
    expected = net(torch.from_numpy(features)).numpy()
  logits, updates = model.apply(
    variables, features, mask, offsets, train=True, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
  # Three BN calls per step: the running statistics are updated three times, in order.
  np.testing.assert_allclose(
    updates["batch_stats"]["bn"]["mean"], t(net.bn.running_mean), atol=1e-6
  )
  np.testing.assert_allclose(updates["batch_stats"]["bn"]["var"], t(net.bn.running_var), atol=1e-6)

  net.eval()
  with torch.no_grad():
    expected = net(torch.from_numpy(features)).numpy()
  variables["batch_stats"] = updates["batch_stats"]
  np.testing.assert_allclose(_apply(model, variables, features, mask, offsets), expected, atol=1e-5)


def test_gru_matches_torch_gru():
  torch.manual_seed(0)
  hidden = 12
  rng = np.random.default_rng(1)
  features = rng.normal(size=(BATCH, LENGTH, DIM)).astype(np.float32)
  mask = np.ones((BATCH, LENGTH), bool)
  offsets = np.zeros((BATCH, LENGTH), np.float32)
  gru = torch.nn.GRU(DIM, hidden, num_layers=1, batch_first=True)
  head = torch.nn.Linear(hidden, 2)
  with torch.no_grad():
    _, final = gru(torch.from_numpy(features))
    expected = head(final[0]).numpy()

  model = temporal.TemporalGRU(hidden_dim=hidden, time_dim=0)
  t = lambda p: p.detach().numpy()  # noqa: E731
  params = {
    "gru_0": temporal.gru_params_from_torch(
      t(gru.weight_ih_l0), t(gru.weight_hh_l0), t(gru.bias_ih_l0), t(gru.bias_hh_l0)
    ),
    "head": {"kernel": t(head.weight).T, "bias": t(head.bias)},
  }
  init_shapes = jax.tree.map(jnp.shape, _init(model, features, mask, offsets)["params"])
  assert jax.tree.map(jnp.shape, params) == init_shapes
  got = _apply(model, {"params": params}, features, mask, offsets)
  np.testing.assert_allclose(got, expected, atol=1e-5)


MODELS = {
  "image": temporal.LinearHead(),
  "gru": temporal.TemporalGRU(hidden_dim=16, num_layers=2),
  "transformer": temporal.TemporalTransformer(model_dim=16, mlp_dim=32, position_embedding=True),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_padding_never_matters(kind):
  model = MODELS[kind]
  features, mask, offsets = _sequences()
  variables = _init(model, features, mask, offsets)
  reference = _apply(model, variables, features, mask, offsets)

  noisy = features.copy()
  noisy[~mask] = np.random.default_rng(2).normal(size=(int((~mask).sum()), DIM)) * 10
  np.testing.assert_allclose(_apply(model, variables, noisy, mask, offsets), reference, atol=1e-5)

  start = [_to_start_padding(a) for a in (features, mask, offsets)]
  np.testing.assert_allclose(_apply(model, variables, *start), reference, atol=1e-5)


def test_transformer_sees_time_gaps_and_handles_one_image():
  model = temporal.TemporalTransformer(model_dim=16, mlp_dim=32)
  features, mask, offsets = _sequences()
  variables = _init(model, features, mask, offsets)
  reference = _apply(model, variables, features, mask, offsets)
  changed = _apply(model, variables, features, mask, offsets * 2.0)
  multi = LENGTHS > 1
  assert np.all(np.abs(changed - reference)[multi].max(axis=1) > 1e-4)
  np.testing.assert_allclose(changed[~multi], reference[~multi], atol=1e-6)

  single = np.zeros((BATCH, LENGTH), bool)
  single[:, 0] = True
  out = _apply(model, variables, features, single, np.zeros_like(offsets))
  assert np.all(np.isfinite(out))
  nothing = _apply(model, variables, features, np.zeros_like(single), np.zeros_like(offsets))
  assert np.all(np.isfinite(nothing))


def test_gru_and_transformer_train_mode_runs():
  features, mask, offsets = _sequences()
  for model in (MODELS["gru"], MODELS["transformer"]):
    variables = _init(model, features, mask, offsets)
    out = model.apply(
      variables, features, mask, offsets, train=True, rngs={"dropout": jax.random.key(3)}
    )
    assert out.shape == (BATCH, 2) and out.dtype == jnp.float32


def test_build_temporal_model():
  assert isinstance(temporal.build_temporal_model("dnn", 2, hidden_dim=8), temporal.TemporalDNN)
  assert temporal.build_temporal_model("gru", 3).num_classes == 3
  assert isinstance(temporal.build_temporal_model("image", 2), temporal.LinearHead)
  assert isinstance(temporal.build_temporal_model("transformer", 2), temporal.TemporalTransformer)
  with pytest.raises(ValueError, match="image, dnn, gru, transformer"):
    temporal.build_temporal_model("lstm", 2)
