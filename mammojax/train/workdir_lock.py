"""One job per workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` for the life of a run.

The lock file records who holds it (pid, host, start time), so a second job is refused with a
message that names the first. The operating system releases a flock when its process dies, so a
file left behind by a killed job is recognised by being lockable while it still names a holder:
the new job reports it and takes over. A clean release empties the file (it is never removed,
so two jobs can never lock two different files of the same name).

Locks are re-entrant within a process (``main`` holds the workdir while a pretraining stage
trains in ``WORKDIR/<stage>`` and the main run then trains in ``WORKDIR`` itself), and several
processes of one multi-host job count as one: process 0 holds the lock and tells the others
whether it got it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from mammojax.console import InputError

log = logging.getLogger("mammojax")

LOCK_FILE = ".lock"


class WorkdirInUseError(InputError, RuntimeError):
  """Another job holds the workdir; the message names its pid, host and start time. A command
  ends on it with exit code 2 (``console.run_program``)."""


_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth] for this process
_held_guard = threading.Lock()


def _describe(holder: dict) -> str:
  return (
    f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    f" since {holder.get('started', '?')}"
  )


def _read_holder(fd: int) -> dict | None:
  """The pid/host/start time written into an open lock file; None if it is empty or garbled."""
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode("utf-8", errors="replace").strip()
  if not text:
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {"pid": "?", "host": "?", "started": f"? (unreadable lock file: {text[:80]!r})"}
  return holder if isinstance(holder, dict) else None


def acquire(workdir: str) -> None:
  """Takes ``workdir``'s lock for this process (again, if it already holds it).

  Raises:
    WorkdirInUseError: another process holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  with _held_guard:
    if path in _held:
      _held[path][1] += 1
      return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      who = _describe(holder) if holder else "another process (it has not written its pid yet)"
      raise WorkdirInUseError(
        f"{workdir} is in use by {who}; wait for it or use another --workdir"
      ) from None
    try:
      previous = _read_holder(fd)
      if previous is not None:
        log.info(
          "a previous job (pid %s on host %s, started %s) ended without releasing %s; continuing",
          previous.get("pid", "?"),
          previous.get("host", "?"),
          previous.get("started", "?"),
          path,
        )
      me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      }
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (json.dumps(me) + "\n").encode())
      os.fsync(fd)
    except BaseException:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)
      raise
    _held[path] = [fd, 1]


def release(workdir: str) -> None:
  """Gives back one :func:`acquire` of ``workdir``; the last one empties and unlocks the file."""
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  with _held_guard:
    entry = _held.get(path)
    if entry is None:
      return
    entry[1] -= 1
    if entry[1] > 0:
      return
    del _held[path]
    fd = entry[0]
    try:
      os.ftruncate(fd, 0)  # empty = released cleanly (a non-empty unlocked file is stale)
    finally:
      # Unlock explicitly: a forked child (a data worker) may still share the descriptor.
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s lock for the ``with`` block (released on any exit; the OS releases it
  if the process dies). In a multi-host job process 0 holds it and every process raises
  :class:`WorkdirInUseError` if process 0 could not take it."""
  if jax.process_count() == 1:
    acquire(workdir)
    try:
      yield
    finally:
      release(workdir)
    return
  error = None
  if jax.process_index() == 0:
    try:
      acquire(workdir)
    except WorkdirInUseError as e:
      error = e
  refused = multihost_utils.process_allgather(np.int32(error is not None))
  if error is not None:
    raise error
  if np.max(refused):
    raise WorkdirInUseError(f"{workdir} is in use by another job (process 0 names it)")
  try:
    yield
  finally:
    if jax.process_index() == 0:
      release(workdir)
