"""Data settings (frozen dataclasses) filled from a config's sections by field name."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

Spec = TypeVar("Spec")


def spec_from_config(cls: type[Spec], *sections: Mapping[str, Any]) -> Spec:
  """``cls`` with each field taken from the first section that has it (sequences become
  tuples); fields no section has keep their defaults.

  ``spec_from_config(SyntheticMILSpec, data.synthetic, data)`` reads the generator settings
  from ``data.synthetic`` and ``image_size`` from ``data``.
  """
  values = {}
  for field in dataclasses.fields(cls):
    for section in sections:
      if field.name in section:
        value = section[field.name]
        values[field.name] = tuple(value) if isinstance(value, list | tuple) else value
        break
  return cls(**values)
