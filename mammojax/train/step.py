"""The train state and the pure train / predict steps that the trainer jits once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mammojax.train.task import Batch, Task


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. ``model_state`` holds the mutable collections (batch_stats)."""

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any


def cast_floating(tree: Any, dtype: jnp.dtype | None) -> Any:
  """Casts floating-point leaves to ``dtype`` (mixed precision); ``None`` leaves the tree."""
  if dtype is None:
    return tree
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree
  )


def make_train_step(
  task: Task,
  tx: optax.GradientTransformation,
  trainable: Any,
  base_rng: jax.Array,
  compute_dtype: jnp.dtype | None,
  schedule: optax.Schedule,
  pass_loss_value: bool,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  Args:
    trainable: bool tree like ``params``; False leaves get ``stop_gradient`` so XLA drops
      their backward pass.
    base_rng: folded with the step for dropout and other randomness.
    compute_dtype: e.g. ``jnp.bfloat16``: params and float inputs are cast for the forward and
      backward pass; the optimizer keeps float32 master weights.
    pass_loss_value: give the loss to the update rule (reduce-on-plateau needs it).
  """

  def loss_fn(params, state: TrainState, batch: Batch, rng):
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    loss, (metrics, model_state) = task.loss(
      cast_floating(params, compute_dtype),
      state.model_state,
      cast_floating(batch, compute_dtype),
      rng,
      True,
    )
    return loss.astype(jnp.float32), (metrics, model_state)

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state, batch, rng)
    extra = {"value": loss} if pass_loss_value else {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics.update(
      loss=loss,
      grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(params),
      update_norm=optax.tree.norm(updates),
      learning_rate=schedule(state.step),
    )
    new_state = state.replace(
      step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    return new_state, metrics

  return train_step


def make_predict_step(
  task: Task, compute_dtype: jnp.dtype | None
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Builds ``predict_step(state, batch) -> per-example outputs`` plus passthrough fields."""
  keys = task.eval_passthrough_keys()

  def predict_step(state: TrainState, batch: Batch):
    variables = {"params": cast_floating(state.params, compute_dtype), **state.model_state}
    outputs = dict(task.predict(variables, cast_floating(batch, compute_dtype)))
    outputs = jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, outputs
    )
    for key in keys:
      outputs[key] = batch[key]
    outputs["_valid"] = batch["_valid"]
    return outputs

  return predict_step
