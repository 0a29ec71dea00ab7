"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

The mesh comes from ``config.mesh`` (``axes`` names, ``shape`` with one ``-1`` for "all remaining
devices"). Modules annotate parameters with logical axis names (``nn.with_logical_partitioning``);
``config.sharding_rules`` maps those names to mesh axes. A mesh axis that does not divide an
array dimension is dropped for that dimension (e.g. a 3-channel input conv stays replicated), so
any model runs on any mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(
  axes: Sequence[str], shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A mesh over all (or the given) devices; one entry of ``shape`` may be -1."""
  devices = list(devices if devices is not None else jax.devices())
  axes, shape = tuple(axes), list(shape)
  if len(axes) != len(shape):
    raise ValueError(
      f"config.mesh.axes {axes} and config.mesh.shape {tuple(shape)} must have the same length"
    )
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {tuple(shape)} may contain at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(
        f"config.mesh.shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}"
      )
    shape[shape.index(-1)] = len(devices) // known
  if -1 not in shape and jax.process_count() == 1 and int(np.prod(shape)) < len(devices):
    devices = devices[: int(np.prod(shape))]  # A smaller mesh on one host: use the first ones.
  if int(np.prod(shape)) != len(devices):
    raise ValueError(
      f"config.mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
      f"there are {len(devices)}; use -1 for 'all remaining devices'"
    )
  return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (those of data/fsdp present)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not evenly divide the dimension they would split."""
  fitted = []
  for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    kept = []
    for name in names:
      size = mesh.shape[name] * int(np.prod([mesh.shape[k] for k in kept]))
      if shape[i] % size == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def variable_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """Shardings for a (boxed, abstract) Flax variable tree, as a tree of unboxed structure."""
  logical = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(
    lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
    mesh_specs,
    shapes,
    is_leaf=lambda x: isinstance(x, P),
  )


def shardings_like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer-state tree: a leaf whose path ends with a parameter's path and
  has its shape gets that parameter's sharding (Adam moments); everything else is replicated."""
  by_path = {}
  for (path, leaf), sharding in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings)
  ):
    by_path[_keys(path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == tuple(getattr(leaf, "shape", ())):
        return match[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def _keys(path: Sequence[Any]) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return tuple(out)
