"""Building what every run needs from a task and its config: the device mesh, the sharded train
state and the jitted train / predict steps.

The trainer, ``benchmarks/train_step.py`` and ``mammojax.runs`` (which restores a workdir or a
converted checkpoint for ``evaluate``, ``ablate`` and whatever runs a trained model) all build
through :func:`build`, so a state is laid out, initialised and compiled the same way wherever it
is used. Commands that need only a run's variables, not its state (``register --model``,
``extract_features``), read them with ``init_state.load_pretrained``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mammojax.data.pipelines import batching
from mammojax.train import checkpoint, init_state, optim, sharding
from mammojax.train.step import TrainState, make_predict_step, make_train_step
from mammojax.train.task import Batch, Task

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Built:
  """A task's initialised, sharded state over a mesh, and the functions that run it."""

  config: ml_collections.ConfigDict
  task: Task
  mesh: Mesh
  batch_sharding: NamedSharding
  init: init_state.Initialized

  @property
  def state(self) -> TrainState:
    """The initial state (pretrained pieces and ``init_from`` already loaded)."""
    return self.init.state

  @property
  def compute_dtype(self) -> jnp.dtype | None:
    return COMPUTE_DTYPES[self.config.train.compute_dtype]

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state: the target of a checkpoint restore."""
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      self.init.state,
      self.init.shardings,
    )

  def restore(self, directory: str, step: int | None = None) -> tuple[TrainState, int]:
    """The train state saved in a run's ``checkpoints`` or ``best`` directory (its newest step
    unless ``step`` is given), laid out like this build's state."""
    return checkpoint.restore_state_only(directory, self.abstract_state(), step)

  def train_step(self):
    """``(state, batch) -> (state, metrics)``, jitted with the state donated."""
    config = self.config
    step = make_train_step(
      self.task,
      self.init.tx,
      self.init.trainable,
      jax.random.key(config.seed + 1, impl=config.rng_impl),
      self.compute_dtype,
      optim.learning_rate_schedule(config.optim, config.train.steps),
      optim.uses_loss_value(config),
    )
    return jax.jit(
      step,
      in_shardings=(self.init.shardings, self.batch_sharding),
      out_shardings=(self.init.shardings, NamedSharding(self.mesh, P())),
      donate_argnums=0,
    )

  def predict_step(self):
    """``(state, batch) -> per-example outputs``, jitted."""
    return jax.jit(
      make_predict_step(self.task, self.compute_dtype),
      in_shardings=(self.init.shardings, self.batch_sharding),
    )


def check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Every global batch size must split evenly over the data-parallel devices."""
  data_parallel = sharding.data_parallel_size(mesh)
  for name, size in (
    ("train.batch_size", config.train.batch_size),
    ("eval.batch_size", config.eval.batch_size),
  ):
    if size % data_parallel:
      raise ValueError(
        f"config.{name}={size} must be divisible by the data-parallel mesh size "
        f"{data_parallel} ({mesh.devices.size} devices, config.mesh.shape="
        f"{tuple(config.mesh.shape)})"
      )


def example_batch(task: Task, mesh: Mesh, split: str = "train") -> Batch:
  """One host batch of ``split`` (one example per data-parallel device) to initialise with."""
  return next(
    batching.eval_batches(
      task.dataset(split),
      global_batch_size=sharding.data_parallel_size(mesh),
      process_index=0,
      process_count=1,
    )
  )


def build(task: Task, config: ml_collections.ConfigDict, example_split: str = "train") -> Built:
  """Mesh from ``config.mesh``, then the sharded initial state of ``task``, shaped by one
  :func:`example_batch` of ``example_split``."""
  mesh = sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  check_batch_sizes(config, mesh)
  init = init_state.create_train_state(task, config, mesh, example_batch(task, mesh, example_split))
  return Built(
    config=config,
    task=task,
    mesh=mesh,
    batch_sharding=sharding.batch_sharding(mesh),
    init=init,
  )
