"""Writing files atomically: readers see the old file or the complete new one, never a part.

Everything is written to a temporary name in the destination's directory (so the rename stays
on one file system) and renamed onto the destination with ``os.replace`` only once the writing
succeeded; on any failure the temporary file is removed and the destination is left as it was.
The temporary name is ``<path>.tmp-<pid>``: ``python -m mammojax.ingest`` recognises shards with
that suffix as left by an interrupted run.

This module is the lowest layer: it imports nothing from mammojax.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike


def temporary_path(path: PathLike) -> str:
  """The name :func:`atomic_path` writes ``path`` under before renaming it."""
  return f"{os.fspath(path)}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
  """Yields a temporary path for a writer that takes a file name (e.g. an ArrayRecord writer);
  renames it onto ``path`` when the block succeeds, removes it when the block raises.

  The block must have closed the file when it ends.
  """
  tmp = temporary_path(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_write(
  path: PathLike,
  mode: str = "w",
  *,
  fsync: bool = False,
  permissions: int | None = None,
  **open_kwargs: Any,
) -> Iterator[IO[Any]]:
  """``with atomic_write(path) as f: f.write(...)``: ``open(tmp, mode)``, renamed onto ``path``
  when the block succeeds, removed when it raises.

  Args:
    path: the destination file.
    mode: ``'w'``, ``'wb'`` or another :func:`open` mode that truncates.
    fsync: flush the data to disk before the rename, so a crash right after it cannot leave an
      empty file behind the new name.
    permissions: ``chmod`` the temporary file to these bits before anything is written (e.g.
      ``0o600`` for secrets); default the process umask's.
    **open_kwargs: passed to :func:`open` (``newline``, ``encoding``, ...).
  """
  if "w" not in mode:
    raise ValueError(f"atomic_write writes a new file: mode must contain 'w', got {mode!r}")
  with atomic_path(path) as tmp:
    with open(tmp, mode, **open_kwargs) as f:
      if permissions is not None:
        os.chmod(tmp, permissions)
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: PathLike, obj: Any, **json_kwargs: Any) -> None:
  """``json.dump(obj, f, **json_kwargs)`` into ``path`` atomically (nothing is left when ``obj``
  cannot be serialised)."""
  with atomic_write(path, "w") as f:
    json.dump(obj, f, **json_kwargs)


def write_npy_atomic(path: PathLike, array: Any) -> None:
  """``np.save`` of ``array`` into ``path`` atomically (``path`` is used as given: no ``.npy`` is
  appended)."""
  with atomic_write(path, "wb") as f:
    np.save(f, array)
