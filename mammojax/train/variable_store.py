"""Stored variable trees: what the importers write and what ``--config.init_from`` reads.

A converted checkpoint is a directory with ``variables/`` (an orbax PyTree checkpoint of the
Flax variable dict ``{'params': ..., 'batch_stats': ...}``) and ``source.json`` (what it was
converted from). Written to a temporary directory and renamed, so an interrupted conversion
never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp


def save_variables(directory: str, variables: Mapping[str, Any], source: Mapping[str, Any]) -> None:
  """Writes a variable tree (numpy or jax arrays) and its provenance to ``directory``."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} already exists; choose another --out or remove it")
  tmp = f"{directory}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  tree = _to_numpy(variables)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "variables"), tree)
  with open(os.path.join(tmp, "source.json"), "w") as f:
    json.dump(dict(source), f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, directory)


def load_variables(directory: str) -> dict[str, Any]:
  """Reads a tree written by :func:`save_variables` as numpy arrays."""
  path = os.path.join(os.path.abspath(directory), "variables")
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f"{path} not found: {directory!r} is not a converted mammojax "
      "checkpoint (create one with `python -m mammojax.convert`)"
    )
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(path)
  except Exception as e:  # orbax raises many types for damaged files.
    raise ValueError(
      f"could not read the checkpoint at {path}: {e}. The directory is damaged; "
      "convert the source checkpoint again"
    ) from e
  return _to_numpy(tree)


def read_source(directory: str, kind: str, flag: str = "--model") -> dict[str, Any]:
  """``source.json`` of a converted checkpoint of ``kind`` (``python -m mammojax.convert KIND``),
  or an error naming ``flag``, the file and the command that makes it."""
  path = os.path.join(directory, "source.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{flag}: {path} does not exist (convert the weights with "
      f"python -m mammojax.convert {kind} FILE --out={directory})"
    )
  with open(path) as f:
    source = json.load(f)
  if source.get("kind") != kind:
    raise ValueError(f"{flag}: {directory} holds a {source.get('kind')!r} checkpoint, not {kind}")
  return source


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
