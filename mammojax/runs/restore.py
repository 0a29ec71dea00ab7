"""Building a run's state from a config and restoring a trained one: the API every command uses.

  built = runs.build_run(config)                         # fresh (or ``init_from``) state
  run = runs.restore_run("runs/imgfeatalign")            # its config, best checkpoint, data
  run = runs.restore_run("runs/x", checkpoint="latest")  # or a step number
  outputs = run.built.predict_step()(run.state, batch)

A *workdir* is a training run's directory (``config.json`` and ``best/`` or ``checkpoints/``); a
*converted checkpoint* is what ``python -m mammojax.convert`` writes (``variables/`` and
``source.json``); it holds weights only, so it is restored into the model a config describes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from mammojax import tasks
from mammojax.data import records
from mammojax.runs.config_files import load_run_config
from mammojax.train.build import Built, build
from mammojax.train.step import TrainState

CHECKPOINT_CHOICES = ("best", "latest")


@dataclasses.dataclass
class Restored:
  """A trained state ready to run.

  Attributes:
    built: the task, mesh and jitted steps the state belongs to.
    state: the restored train state.
    step: the training step it was saved at (0 for a converted checkpoint).
    source: where it came from (``'<workdir>/best'``, ``'<dir> (converted)'``).
  """

  built: Built
  state: TrainState
  step: int
  source: str

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.built.config

  @property
  def task(self):
    return self.built.task

  @property
  def variables(self) -> dict[str, Any]:
    """The Flax variable dict ``{'params': ..., 'batch_stats': ...}`` of the state."""
    return {"params": self.state.params, **self.state.model_state}

  def data_manifest(self) -> dict[str, Any] | None:
    """The manifest of the ingested dataset the run trained on (``config.data.dir``): its
    preprocessing settings and pixel statistics; ``None`` for synthetic data."""
    data_dir = self.config.get("data", {}).get("dir", "")
    return records.read_manifest(data_dir) if data_dir else None


def build_run(config: ml_collections.ConfigDict, example_split: str = "train") -> Built:
  """The task ``config.task`` names, with its sharded initial state (see ``train.build``)."""
  return build(tasks.build_task(config), config, example_split)


def is_workdir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json"))


def is_converted_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "variables"))


def restore_run(
  path: str,
  config: ml_collections.ConfigDict | None = None,
  checkpoint: str | int = "best",
  example_split: str = "train",
) -> Restored:
  """Restores a workdir or a converted checkpoint.

  Args:
    path: a training workdir or a converted checkpoint directory.
    config: the experiment config; default: the workdir's ``config.json``. Required for a
      converted checkpoint (its weights go into the model this config describes).
    checkpoint: ``'best'`` (falls back to the newest step when the run tracked no best),
      ``'latest'``, or a step number of ``checkpoints/``.
    example_split: the split whose first examples give the state's shapes (one that exists in
      the data the config points at).
  Raises:
    FileNotFoundError / ValueError: with the path and what to pass instead.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"{path} is not a directory (give a training workdir or a converted checkpoint directory)"
    )
  if is_converted_checkpoint(path) and not is_workdir(path):
    if config is None:
      raise ValueError(
        f"{path} is a converted checkpoint (weights only): pass the experiment's --config too"
      )
    config = config.copy_and_resolve_references()
    config.init_from = path
    built = build_run(config, example_split)
    return Restored(built=built, state=built.state, step=0, source=f"{path} (converted)")
  if config is None:
    config = load_run_config(path)
  built = build_run(config, example_split)
  directory = _checkpoint_dir(path, checkpoint)
  step = checkpoint if isinstance(checkpoint, int) else None
  state, step = built.restore(directory, step)
  return Restored(built=built, state=state, step=step, source=directory)


def _checkpoint_dir(workdir: str, checkpoint: str | int) -> str:
  workdir = os.path.abspath(workdir)
  if isinstance(checkpoint, int) or checkpoint == "latest":
    return os.path.join(workdir, "checkpoints")
  if checkpoint != "best":
    raise ValueError(
      f"checkpoint must be one of {CHECKPOINT_CHOICES} or a step number, got {checkpoint!r}"
    )
  best = os.path.join(workdir, "best")
  if os.path.isdir(best) and any(name.isdigit() for name in os.listdir(best)):
    return best
  return os.path.join(workdir, "checkpoints")
