"""Saving matplotlib figures the way every other output is written: atomically."""

from __future__ import annotations

import os
from typing import Any

from mammojax.atomic_files import atomic_write


def save_png(figure: Any, path: str | os.PathLike, dpi: float | None = None) -> str:
  """Writes ``figure`` as a PNG to ``path`` (under a temporary name, then renamed), creating the
  folder if needed; returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_write(path, "wb") as f:
    figure.savefig(f, format="png", dpi=dpi)
  return os.fspath(path)
