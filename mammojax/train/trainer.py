"""The one training loop every task runs through (``train_and_evaluate``)."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from mammojax.atomic_files import atomic_write, write_json_atomic
from mammojax.data.pipelines import batching
from mammojax.train import checkpoint, evaluation, workdir_lock
from mammojax.train.build import build
from mammojax.train.metric_writer import MetricWriter
from mammojax.train.task import Task

log = logging.getLogger("mammojax")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the checkpoint to resume from."""


class ConfigError(ValueError):
  """The config does not fit the task or its data (found before the first step, or at the first
  evaluation after saving the step); the message says what to change."""


class Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (then it saves and stops).

  Nested ones share the signal: a SIGTERM sets the flag of every enclosing one (``main`` holds
  one around the pretraining stages and the main run, so a stage that was preempted stops the
  job), and one entered after its encloser was signalled starts requested.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False

  def __enter__(self) -> Preemption:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # Not the main thread (e.g. inside some test runners): no handler.
      self._previous = None
    outer = getattr(self._previous, "__self__", None)
    if isinstance(outer, Preemption) and outer.requested:
      self.requested = True
    return self

  def _handle(self, signum, frame):
    self.requested = True
    if callable(self._previous):
      self._previous(signum, frame)

  def stop_requested(self) -> bool:
    """Whether any host got SIGTERM: all hosts must stop at the same step to save together."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))

  def __exit__(self, *exc):
    if self._installed and self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  task: Task,
  show_progress: bool = True,
  stop_after: int | None = None,
) -> dict[str, Any]:
  """Trains ``task`` as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

  The workdir is locked for the whole call (:mod:`mammojax.train.workdir_lock`): a second job on
  it is refused with :class:`~mammojax.train.workdir_lock.WorkdirInUseError`. The config and the
  data splits it needs are checked before anything is built (:class:`ConfigError`).

  Args:
    config: the experiment config.
    workdir: where checkpoints, metrics and the summary go.
    task: the task to train.
    show_progress: show a progress bar (process 0).
    stop_after: checkpoint and return after this many steps of this call (a time slice of a
      longer job; the next call resumes where this one stopped).

  Returns:
    A summary: the last step, the last train metrics, the last eval metrics, the best eval
    metrics of the whole run (all segments) and why training stopped (``'steps'``,
    ``'early_stopping'``, ``'preempted'`` or ``'slice'``).
  """
  check_config(config)
  with workdir_lock.hold(workdir), Preemption() as preemption:
    return _train(config, workdir, task, show_progress, stop_after, preemption)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` for step counts and batch sizes that cannot train."""
  for field in (
    "train.steps",
    "train.batch_size",
    "eval.batch_size",
    "eval.every_steps",
    "logging.every_steps",
    "checkpoint.every_steps",
  ):
    section, name = field.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ConfigError(f"config.{field} must be a positive integer, got {value!r}")


def _train(
  config: ml_collections.ConfigDict,
  workdir: str,
  task: Task,
  show_progress: bool,
  stop_after: int | None,
  preemption: Preemption,
) -> dict[str, Any]:
  """:func:`train_and_evaluate` once the config is checked and the workdir is locked."""
  train_examples = _open_split(task, config, "train", "the training split")
  _open_split(task, config, config.eval.split, "config.eval.split")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with atomic_write(os.path.join(workdir, "config.json")) as f:
      f.write(config.to_json_best_effort(indent=2))
  data_iter = batching.train_iterator(
    train_examples,
    seed=config.seed,
    global_batch_size=config.train.batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    workers=config.data.get("workers", 0),
    augmentations=task.augmentations(),
  )
  built = build(task, config)
  batch_sharding = built.batch_sharding
  train_step = built.train_step()
  predict_step = built.predict_step()

  best_metric = config.checkpoint.best_metric
  ckpt = checkpoint.Checkpoints(
    workdir,
    keep=config.checkpoint.keep,
    best_metric=best_metric,
    best_mode=config.checkpoint.best_mode,
  )
  state = built.state
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, built.abstract_state(), data_iter)
    log.info("resumed from %s/%d", ckpt.directory, start)
  start = int(state.step)

  writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard, start_step=start)
  summary: dict[str, Any] = {"stopped": "steps", "best": None, "eval": None, "train": None}
  best_value, summary["best"], evals_since_best = _previous_best(ckpt, writer.history)
  total = config.train.steps
  bar = tqdm(
    total=total,
    initial=start,
    disable=not (show_progress and jax.process_index() == 0),
    unit="step",
    dynamic_ncols=True,
    desc=config.get("name", "train"),
  )
  log_sums: dict[str, float] = {}
  log_count, log_start = 0, time.perf_counter()
  pending = None  # (step, metrics) of the previous step, checked after the next is dispatched.
  last_saved = start

  def save(step: int) -> None:
    nonlocal last_saved, pending
    if pending is not None:  # never save a state whose loss was not checked
      check_and_accumulate(*pending)
      pending = None
    if step != last_saved:
      ckpt.save(step, state, data_iter, force=True)
      last_saved = step

  def check_and_accumulate(step: int, metrics: dict) -> None:
    nonlocal log_count
    host = jax.device_get(metrics)
    loss = float(host["loss"])
    if not math.isfinite(loss):
      ckpt.wait()
      newest = ckpt.latest_step()
      resume = (
        f"The newest checkpoint is {ckpt.directory}/{newest} (step {newest}), which a rerun "
        "resumes from."
        if newest is not None
        else "No checkpoint was saved yet: a rerun starts from the initial state."
      )
      raise NonFiniteLossError(
        f"loss is {loss} at step {step} (the update from step {step} to {step + 1}; "
        f"train/grad_norm={float(host['grad_norm'])}); nothing from it was saved. {resume} "
        "Lower optim.learning_rate, enable optim.clip_grad_norm, or check the input data."
      )
    for key, value in host.items():
      log_sums[key] = log_sums.get(key, 0.0) + float(value)
    log_count += 1

  try:
    end = total
    if start < total and preemption.stop_requested():  # SIGTERM before the first step
      summary["stopped"] = "preempted"
      log.warning("preempted before step %d; nothing to save", start)
      end = start
    for step in range(start, end):
      batch = evaluation.to_global(next(data_iter), batch_sharding)
      state, metrics = train_step(state, batch)
      if pending is not None:
        check_and_accumulate(*pending)
      pending = (step, metrics)
      done = step + 1
      bar.update(1)
      is_log = done % config.logging.every_steps == 0 or done == total
      is_eval = done % config.eval.every_steps == 0 or done == total
      if is_log or is_eval:
        check_and_accumulate(*pending)
        pending = None
      if is_log:  # check_and_accumulate just ran, so log_count >= 1
        elapsed = time.perf_counter() - log_start
        train_metrics = {f"train/{k}": v / log_count for k, v in log_sums.items()}
        train_metrics["train/steps_per_sec"] = log_count / elapsed
        train_metrics["train/examples_per_sec"] = log_count * config.train.batch_size / elapsed
        writer.write(done, train_metrics)
        bar.set_postfix(loss=f"{train_metrics['train/loss']:.4f}")
        summary["train"] = train_metrics
        log_sums.clear()
        log_count, log_start = 0, time.perf_counter()
      if is_eval:
        eval_metrics = {
          f"eval/{k}": v
          for k, v in evaluation.evaluate_split(
            task, predict_step, state, config.eval.split, config.eval.batch_size, batch_sharding
          ).items()
        }
        writer.write(done, eval_metrics)
        writer.flush()
        summary["eval"] = eval_metrics
        log.info("step %d: %s", done, _short(eval_metrics))
        if best_metric and best_metric not in eval_metrics:
          save(done)
          ckpt.wait()
          raise ConfigError(
            f"config.checkpoint.best_metric={best_metric!r} is not among the metrics the task "
            f"reports: {sorted(eval_metrics)}. Step {done} is saved in {ckpt.directory}; rerun "
            "with --config.checkpoint.best_metric set to one of them (or '' for none) to "
            "continue from it."
          )
        improved = _improved(eval_metrics, config.checkpoint, best_value)
        if improved is not None:
          best_value, evals_since_best = improved, 0
          summary["best"] = {"step": done, **eval_metrics}
          ckpt.save_best(done, state, eval_metrics)
        else:
          evals_since_best += 1
      if done % config.checkpoint.every_steps == 0 or done == total:
        save(done)
      patience = config.eval.early_stopping_patience
      if is_eval and patience and evals_since_best >= patience:
        summary["stopped"] = "early_stopping"
        save(done)
        log.info(
          "early stopping at step %d: %s did not improve for %d evaluations",
          done,
          best_metric,
          patience,
        )
        break
      if stop_after is not None and done - start >= stop_after and done < total:
        summary["stopped"] = "slice"
        save(done)
        break
      if preemption.stop_requested() or ckpt.reached_preemption(done):
        summary["stopped"] = "preempted"
        save(done)
        log.warning("preempted: saved step %d to %s", done, ckpt.directory)
        break
    if pending is not None:
      check_and_accumulate(*pending)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  summary["step"] = int(state.step)
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "summary.json"), summary, indent=2, default=float)
  return summary


def _open_split(task: Task, config: ml_collections.ConfigDict, split: str, role: str) -> Any:
  """``task.dataset(split)``, or a :class:`ConfigError` naming the split and the data directory
  when it has no examples (a split without shards fails inside Grain with "Paths sequence can
  not be of 0 length")."""
  try:
    examples = task.dataset(split)
  except ValueError as e:
    if "0 length" not in str(e):
      raise
    examples = None
  if examples is None or len(examples) == 0:
    raise ConfigError(
      f"the {split!r} split ({role}) of {_data_location(task, config)} has no examples; "
      "point the config at a dataset that has some, or choose another split"
    )
  return examples


def _data_location(task: Task, config: ml_collections.ConfigDict) -> str:
  """The data directory a task reads, as far as the trainer can tell (``config.data.dir`` or
  ``features_dir``, or the directory the task resolved, e.g. a generated synthetic dataset)."""
  data = config.get("data") or {}
  for value in (data.get("features_dir"), data.get("dir"), getattr(task, "_data_dir", None)):
    if value:
      return str(value)
  return "the task's data (config.data)"


def _previous_best(
  ckpt: checkpoint.Checkpoints, history: list[dict]
) -> tuple[float | None, dict[str, Any] | None, int]:
  """What an earlier segment of the run found best, so that model selection and
  ``summary['best']`` continue across restarts: the value of the best metric that ``best/``
  holds, its eval row from the kept ``metrics.jsonl`` (just the step and the value if the row
  is gone), and the evaluations since then (for early stopping)."""
  found = ckpt.best_so_far()
  if found is None:
    return None, None, 0
  step, value = found
  name = ckpt.best_metric
  evals = [row for row in history if name in row]
  row = next((r for r in evals if r["step"] == step), {name: value})
  since = sum(1 for r in evals if r["step"] > step)
  if jax.process_count() > 1:  # Only process 0 reads metrics.jsonl; all must stop together.
    since = int(multihost_utils.process_allgather(np.int32(since))[0])
  log.info("best %s so far: %.6g at step %d", name, value, step)
  return value, {**row, "step": step}, since


def _improved(
  metrics: dict[str, float], ckpt_config: ml_collections.ConfigDict, best: float | None
) -> float | None:
  """The new best value of the selection metric if it improved, else None."""
  name = ckpt_config.best_metric
  if not name:
    return None
  if name not in metrics:
    raise KeyError(
      f"config.checkpoint.best_metric={name!r} is not among the eval metrics {sorted(metrics)}"
    )
  value = metrics[name]
  if value is None or not np.isfinite(value):
    return None
  if best is None or (value > best if ckpt_config.best_mode == "max" else value < best):
    return float(value)
  return None


def _short(metrics: dict[str, float]) -> str:
  return ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float))
