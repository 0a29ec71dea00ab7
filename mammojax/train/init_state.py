"""Creating the sharded train state: initial variables, pretrained pieces, optimizer state."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mammojax.train import optim, sharding
from mammojax.train.checkpoint import restore_state_only
from mammojax.train.step import TrainState
from mammojax.train.task import Batch, Task
from mammojax.train.variable_store import load_variables


@dataclasses.dataclass
class Initialized:
  state: TrainState
  shardings: TrainState
  tx: optax.GradientTransformation
  trainable: Any


def create_train_state(
  task: Task, config: ml_collections.ConfigDict, mesh: Mesh, example_batch: Batch
) -> Initialized:
  """Initialises variables directly in their shardings, loads pretrained pieces, builds the
  optimizer state sharded like the parameters."""
  rules = [tuple(r) for r in config.sharding_rules]
  init_rng = jax.random.key(config.seed, impl=config.rng_impl)

  def init_fn(rng):
    return task.init_variables(rng, jax.tree.map(jnp.asarray, example_batch))

  abstract_boxed = jax.eval_shape(init_fn, init_rng)
  var_shardings = sharding.variable_shardings(abstract_boxed, mesh, rules)
  variables = jax.jit(lambda rng: nn.meta.unbox(init_fn(rng)), out_shardings=var_shardings)(
    init_rng
  )
  for prefix, directory in pretrained_sources(task, config).items():
    loaded = task.select_pretrained(prefix, load_pretrained(directory), directory)
    variables = merge_variables(variables, loaded, prefix, directory, var_shardings)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  optim.check_freeze_patterns(params, tuple(config.train.freeze))
  freeze = tuple(config.train.freeze) + tuple(task.frozen_param_patterns())
  tx = optim.make_optimizer(config, params, freeze)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_shardings = sharding.shardings_like_params(
    abstract_opt, params, var_shardings["params"], mesh
  )
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  replicated = NamedSharding(mesh, P())
  state = TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
    params=params,
    model_state=model_state,
    opt_state=opt_state,
  )
  shardings = TrainState(
    step=replicated,
    params=var_shardings["params"],
    model_state={k: var_shardings[k] for k in model_state},
    opt_state=opt_shardings,
  )
  trainable = optim.trainable_mask(params, freeze)
  return Initialized(state=state, shardings=shardings, tx=tx, trainable=trainable)


def pretrained_sources(task: Task, config: ml_collections.ConfigDict) -> dict[str, str]:
  """``{variable path prefix: converted-checkpoint dir}``: ``config.init_from`` for the whole
  model, plus whatever pieces the task loads from their own checkpoints."""
  sources = dict(task.pretrained_checkpoints())
  if config.get("init_from"):
    sources[""] = config.init_from
  return sources


def load_pretrained(directory: str) -> dict[str, Any]:
  """Variables from a converted checkpoint (``mammojax.convert``) or from a training run's
  workdir (its ``best`` step if it tracked one, else its latest)."""
  if os.path.isdir(os.path.join(directory, "variables")):
    return load_variables(directory)
  for sub in ("best", "checkpoints"):
    path = os.path.join(os.path.abspath(directory), sub)
    if os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path)):
      state, _ = restore_state_only(path, None)
      return {"params": state["params"], **state["model_state"]}
  raise FileNotFoundError(
    f"{directory} is neither a converted checkpoint (no variables/) nor a "
    "training workdir with finished checkpoints (best/ or checkpoints/)"
  )


def merge_variables(
  variables: Any, loaded: Mapping[str, Any], prefix: str, source: str, shardings: Any
) -> Any:
  """Replaces the leaves of ``variables`` under ``prefix`` (e.g. ``'registration'``: each
  collection's subtree of that name) by those of ``loaded``, checking paths and shapes."""
  out = jax.tree.map(lambda x: x, variables)
  for collection, tree in loaded.items():
    if collection not in out:
      raise ValueError(
        f"{source}: collection {collection!r} does not exist in the model (it has {sorted(out)})"
      )
    target = out[collection]
    target_shardings = shardings[collection]
    for key in [k for k in prefix.split("/") if k]:
      if key not in target:
        raise ValueError(
          f"{source}: the model has no {collection}/{prefix}; its top-level "
          f"modules are {sorted(target)}"
        )
      target, target_shardings = target[key], target_shardings[key]
    _assign(target, target_shardings, tree, f"{collection}/{prefix}".rstrip("/"), source)
  return out


def _assign(
  target: dict, shardings: dict, loaded: Mapping[str, Any], path: str, source: str
) -> None:
  missing = sorted(set(target) - set(loaded))
  unexpected = sorted(set(loaded) - set(target))
  if missing or unexpected:
    raise ValueError(
      f"{source} does not fit the model at {path}: missing {missing}, unexpected {unexpected}"
    )
  for key, value in loaded.items():
    if isinstance(value, Mapping):
      _assign(target[key], shardings[key], value, f"{path}/{key}", source)
      continue
    expected = target[key]
    value = np.asarray(value)
    if tuple(value.shape) != tuple(expected.shape):
      raise ValueError(
        f"{source}: {path}/{key} has shape {value.shape}, the model expects {tuple(expected.shape)}"
      )
    target[key] = jax.device_put(value.astype(expected.dtype), shardings[key])
