"""Optimizers, learning-rate schedules, gradient clipping and parameter freezing.

``config.optim`` selects the optimizer (``adamw`` | ``adam`` | ``sgd``), the schedule
(``constant`` | ``warmup_cosine``), an optional reduce-on-plateau scaling of the updates,
and ``clip_grad_norm``. ``config.train.freeze`` is a list of regular expressions matched
against '/'-joined parameter paths (e.g. ``'registration/.*'``): matching parameters get no
gradient (the trainer stops it) and no optimizer state (``optax.set_to_zero``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  if optim.schedule == "constant":
    return optax.constant_schedule(optim.learning_rate)
  if optim.schedule == "warmup_cosine":
    warmup = int(optim.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim.learning_rate * optim.end_lr_factor,
    )
  raise ValueError(
    f"config.optim.schedule must be 'constant' or 'warmup_cosine', got {optim.schedule!r}"
  )


def param_paths(params: Any) -> Any:
  """A tree like ``params`` whose leaves are the '/'-joined paths of the parameters."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path), params
  )


def trainable_mask(params: Any, freeze: Sequence[str]) -> Any:
  """True where a parameter trains, False where its path fully matches a freeze pattern."""
  patterns = [re.compile(p) for p in freeze]
  return jax.tree.map(
    lambda path: not any(p.fullmatch(path) for p in patterns), param_paths(params)
  )


def check_freeze_patterns(params: Any, freeze: Sequence[str]) -> None:
  """Fails if a pattern matches no parameter: a typo would otherwise silently train everything."""
  paths = jax.tree.leaves(param_paths(params))
  for pattern in freeze:
    if not any(re.fullmatch(pattern, path) for path in paths):
      example = ", ".join(paths[:5])
      raise ValueError(
        f"config.train.freeze pattern {pattern!r} matches no parameter path "
        f"(paths look like: {example}, ...)"
      )


def make_optimizer(
  config: ml_collections.ConfigDict, params: Any, freeze: Sequence[str] = ()
) -> optax.GradientTransformation:
  """The full update rule: clipping, optimizer, schedule, freezing, optional plateau scaling.

  Args:
    freeze: parameter-path regexes to freeze (the task's own plus ``config.train.freeze``).
  """
  optim = config.optim
  schedule = learning_rate_schedule(optim, config.train.steps)
  if optim.name == "adamw":
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  elif optim.name == "adam":
    base = optax.adam(schedule, b1=optim.b1, b2=optim.b2)
  elif optim.name == "sgd":
    base = optax.sgd(schedule, momentum=optim.momentum or None)
  else:
    raise ValueError(f"config.optim.name must be 'adamw', 'adam' or 'sgd', got {optim.name!r}")
  parts = []
  if optim.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(optim.clip_grad_norm))
  parts.append(base)
  rule = optax.chain(*parts)
  if freeze:
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, freeze))
    rule = optax.multi_transform({"train": rule, "frozen": optax.set_to_zero()}, labels)
  if optim.plateau.enabled:
    # Scales updates by factor**k after k plateaus of the training loss, averaged over
    # ``accumulation_steps`` steps (the reference lowers the LR on a plateau once per epoch).
    rule = optax.chain(
      rule,
      optax.contrib.reduce_on_plateau(
        factor=optim.plateau.factor,
        patience=optim.plateau.patience,
        cooldown=optim.plateau.cooldown,
        accumulation_size=optim.plateau.accumulation_steps,
        rtol=optim.plateau.rtol,
      ),
    )
  return rule


def uses_loss_value(config: ml_collections.ConfigDict) -> bool:
  """Whether the update rule needs ``value=loss`` (reduce-on-plateau does)."""
  return bool(config.optim.plateau.enabled)
