"""Orbax checkpoints of the train state together with the Grain data iterator.

``DIR/checkpoints`` keeps the newest ``checkpoint.keep`` steps and is what a restarted job
resumes from; ``DIR/best`` keeps the single best step by ``checkpoint.best_metric``. Orbax
writes each step to a temporary directory and renames it when complete, so a crash or a kill
never leaves a half-written step that looks finished.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mammojax.console import InputError, one_line


class CheckpointDamagedError(InputError, RuntimeError):
  """A checkpoint step that exists but cannot be restored: a file of it is truncated or missing,
  or it was written by an incompatible config. The message names the step's directory and what
  to do. An input error (exit code 2): running the same command again cannot help; removing the
  step (to fall back to an earlier one) or retraining does."""


def _damaged(where: str, error: Exception, advice: str) -> CheckpointDamagedError:
  """The error for step directory ``where`` that orbax could not restore (``error``), with the
  gist of orbax's message: its tensorstore specs cut off and long messages kept to their end,
  which names the file and what is wrong with it."""
  detail = one_line(str(error).split(" [tensorstore_spec")[0]) or type(error).__name__
  if len(detail) > 300:
    detail = "..." + detail[-300:]
  return CheckpointDamagedError(f"checkpoint {where} is damaged or incomplete ({detail}); {advice}")


def _drop_closed_loop_errors() -> None:
  """From now on, drops the "Event loop is closed" errors that tensorstore reports (through
  ``sys.unraisablehook``, from its own threads) for reads that finish after orbax gave up a
  failed restore and closed its event loop; they would bury the restore's one-line error in
  tracebacks. Every other error still reaches the previous hook."""
  if getattr(sys.unraisablehook, "drops_closed_loop", False):
    return
  previous = sys.unraisablehook

  def unraisablehook(unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  unraisablehook.drops_closed_loop = True
  sys.unraisablehook = unraisablehook


def _drop_failed_reads() -> None:
  """Collects orbax's abandoned read tasks of a failed restore now, with asyncio's logger muted,
  so their "Task exception was never retrieved" tracebacks do not reach the console later."""
  asyncio_log = logging.getLogger("asyncio")
  level = asyncio_log.level
  asyncio_log.setLevel(logging.CRITICAL)
  try:
    gc.collect()
  finally:
    asyncio_log.setLevel(level)


class Checkpoints:
  """The two managers of a run: ``latest`` (resume) and ``best`` (model selection)."""

  def __init__(
    self,
    workdir: str,
    keep: int,
    best_metric: str | None,
    best_mode: str,
  ):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.latest = ocp.CheckpointManager(
      self.directory,
      item_names=("state", "data_iter"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )
    self.best = None
    self.best_metric = best_metric
    if best_metric:
      if best_mode not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
      self.best = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "best"),
        item_names=("state",),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          create=True,
          best_fn=lambda m: m[best_metric],
          best_mode=best_mode,
          keep_checkpoints_without_metrics=False,
        ),
      )

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(
    self, step: int, state: Any, data_iter: grain.DatasetIterator, force: bool = False
  ) -> None:
    self.latest.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)
      ),
      force=force,
    )

  def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> None:
    if self.best is None or self.best_metric not in metrics:
      return
    for kept in self.best.all_steps():
      if kept >= step:
        # Saved by a job killed before its next checkpoint, and beaten by this evaluation of
        # the resumed run: orbax would silently skip a save at or before its newest step.
        self.best.delete(kept)
    self.best.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
      metrics={self.best_metric: float(metrics[self.best_metric])},
    )

  def best_so_far(self) -> tuple[int, float] | None:
    """The step and ``best_metric`` value that ``best/`` holds (from an earlier segment of the
    run), or None when it holds none."""
    if self.best is None:
      return None
    step = self.best.best_step()
    if step is None:
      return None
    metrics = self.best.metrics(step) or {}
    if self.best_metric not in metrics:
      return None
    return step, float(metrics[self.best_metric])

  def restore(self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator) -> Any:
    """Restores ``state`` (with the shardings in ``abstract_state``) and the iterator in place."""
    _drop_closed_loop_errors()
    try:
      restored = self.latest.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=grain.checkpoint.CheckpointRestore(data_iter),
        ),
      )
    except Exception as e:  # Orbax raises many exception types for damaged directories.
      error = _damaged(
        f"{self.directory}/{step}",
        e,
        f"it may also have been written by an incompatible config. Remove "
        f"{self.directory}/{step} to resume from the previous step, or start a fresh --workdir",
      )
    else:
      return restored["state"]
    _drop_failed_reads()  # outside the except block, which keeps orbax's frames alive
    raise error

  def reached_preemption(self, step: int) -> bool:
    return self.latest.reached_preemption(step)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    if self.best is not None:
      self.best.close()


def restore_state_only(
  directory: str, abstract_state: Any, step: int | None = None
) -> tuple[Any, int]:
  """Restores only the train state from a ``checkpoints``/``best`` directory.

  ``abstract_state`` carries target shapes and shardings; ``None`` restores host arrays with the
  saved structure (for reading pieces of another run).

  Raises:
    FileNotFoundError: ``directory`` does not exist or holds no finished step.
    ValueError: a parameter's saved shape differs from ``abstract_state``'s.
    CheckpointDamagedError: the step cannot be restored (a truncated or missing file).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory} holds no finished checkpoint")
    if abstract_state is not None:
      _raise_if_shapes_differ(directory, step, abstract_state)
    _drop_closed_loop_errors()
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )
    except Exception as e:  # As above.
      error = _damaged(
        f"{directory}/{step}",
        e,
        f"remove {directory}/{step} to use an earlier step, or retrain the run",
      )
    else:
      return restored["state"], step
  _drop_failed_reads()
  raise error


def _raise_if_shapes_differ(directory: str, step: int, abstract_state: Any) -> None:
  """A ValueError naming the first parameter whose saved shape differs from the model's (a
  model or input width other than the run's), instead of orbax's error deep inside restore."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns about the items this read leaves alone
  try:
    with ocp.StandardCheckpointer() as reader:
      metadata = reader.metadata(os.path.join(directory, str(step), "state"))
    saved = getattr(metadata, "item_metadata", metadata)
  except Exception:  # Metadata unreadable: let restore report what is wrong.
    return
  finally:
    absl_logger.setLevel(level)
  saved_shapes = {
    _slash_path(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]
    if hasattr(leaf, "shape")
  }
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    key = _slash_path(path)
    if key in saved_shapes and saved_shapes[key] != tuple(leaf.shape):
      raise ValueError(
        f"{directory}/{step}: {key} is {list(saved_shapes[key])} in the checkpoint but "
        f"{list(leaf.shape)} in the model built from this config and data; was the run trained "
        "with other model sizes or inputs of another width (e.g. features of another backbone)?"
      )


def _slash_path(path: tuple) -> str:
  """``'params/input/kernel'`` for a tree path of dict keys, attributes or indices."""
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
  return "/".join(names)
