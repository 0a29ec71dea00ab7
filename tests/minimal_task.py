"""A tiny classification task for the trainer's own tests: an MLP with BatchNorm and dropout
(so model_state and rng handling are exercised) on an in-memory dataset."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from mammojax.train.base_config import base_config
from mammojax.train.config_fragments import apply_smoke
from mammojax.train.task import Task


class TinyNet(nn.Module):
  hidden: int = 16

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(
      self.hidden,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
      name="dense1",
    )(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = nn.relu(x)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(
      1,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
      name="head",
    )(x)[:, 0]


class AddNoise(grain.transforms.RandomMap):
  """A random host-side augmentation (tests that it is reproduced on resume)."""

  def __init__(self, scale: float):
    self.scale = scale

  def random_map(self, example, rng):
    return dict(
      example,
      x=example["x"] + self.scale * rng.standard_normal(example["x"].shape).astype(np.float32),
    )


class TinyTask(Task):
  def __init__(self, config):
    super().__init__(config)
    self.model = TinyNet(config.model.hidden)
    rng = np.random.default_rng(0)
    n, d = config.data.num_examples, config.data.dim
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32)
    y = (x @ w > 0).astype(np.float32)
    if config.data.get("nan_at", -1) >= 0:
      x[config.data.nan_at] = np.nan
    self._data = [{"x": x[i], "y": y[i], "name": f"id{i}"} for i in range(n)]

  def init_variables(self, rng, batch):
    return self.model.init({"params": rng, "dropout": rng}, batch["x"], train=False)

  def loss(self, params, model_state, batch, rng, train):
    logits, new_state = self.model.apply(
      {"params": params, **model_state},
      batch["x"],
      train=train,
      rngs={"dropout": rng},
      mutable=list(model_state),
    )
    losses = optax.sigmoid_binary_cross_entropy(logits, batch["y"])
    accuracy = jnp.mean((logits > 0) == (batch["y"] > 0.5))
    return losses.mean(), ({"accuracy": accuracy}, new_state)

  def predict(self, variables, batch):
    return {"logit": self.model.apply(variables, batch["x"], train=False)}

  def evaluate(self, predictions):
    accuracy = np.mean((predictions["logit"] > 0) == (predictions["y"] > 0.5))
    return {"accuracy": float(accuracy), "count": float(len(predictions["y"]))}

  def eval_passthrough_keys(self):
    return ("y",)

  def augmentations(self):
    noise = self.config.data.get("noise", 0.0)
    return (AddNoise(noise),) if noise else ()

  def dataset(self, split):
    return grain.MapDataset.source(self._data if split == "train" else self._data[:37])


def tiny_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "tiny"
  apply_smoke(c, 6, every=3)  # batch 8, logging every step, warmup 1
  c.optim.learning_rate = 1e-2
  c.model = ml_collections.ConfigDict({"hidden": 16})
  c.data.num_examples = 64
  c.data.dim = 8
  c.data.nan_at = -1
  return c
