"""Reading experiment configs from files and workdirs, and addressing their fields by dotted path."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from mammojax.train.run_files import load_run_config

__all__ = ["config_field", "load_config_file", "load_run_config", "set_config_field"]


def load_config_file(path: str, variant: str = "") -> ml_collections.ConfigDict:
  """``get_config(variant)`` of a config file, as ``--config=path:variant`` would load it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_mammojax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def config_field(
  config: ml_collections.ConfigDict, dotted: str, what: str = "config field"
) -> tuple[ml_collections.ConfigDict, str]:
  """``(owner, name)`` such that ``owner[name]`` is the field ``dotted`` (``'model.align'``).

  Raises:
    KeyError: naming ``what`` (e.g. ``'--field'``) when a part of the path does not exist.
  """
  *parents, name = dotted.split(".")
  owner = config
  for depth, part in enumerate(parents):
    if not isinstance(owner, ml_collections.ConfigDict) or part not in owner:
      prefix = ".".join(parents[: depth + 1])
      raise KeyError(f"{what} {dotted!r} names no config field ({prefix!r} does not exist)")
    owner = owner[part]
  if not isinstance(owner, ml_collections.ConfigDict) or name not in owner:
    raise KeyError(f"{what} {dotted!r} names no config field")
  return owner, name


def set_config_field(config: ml_collections.ConfigDict, dotted: str, value: Any, what: str) -> None:
  """Sets the existing field ``dotted`` of ``config`` to ``value``."""
  owner, name = config_field(config, dotted, what)
  owner[name] = value
