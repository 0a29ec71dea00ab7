"""Runs N ``jax.distributed`` processes on this machine: how multi-host training is tested here.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
      --config=configs/imgfeatalign.py:smoke --workdir=/tmp/mp

Everything after ``--`` goes to ``python -m mammojax.main``; the launcher adds
``--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`` (PORT is a free port).
Each process is a CPU "host" with ``--devices_per_process`` fake devices
(``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=K``) and gloo
collectives, so the global mesh has N*K devices spread over N processes, as on a pod.

Output lines are prefixed with ``[pI]``. SIGINT/SIGTERM are forwarded to every process (the
trainer saves a checkpoint on SIGTERM). If one process fails, the others are stopped and the
launcher exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

MAIN_COMMAND = (sys.executable, "-m", "mammojax.main")
# Seconds between SIGTERM and SIGKILL for the survivors of a failed process: they are usually
# blocked in a collective with the dead one and cannot reach their own SIGTERM handling.
KILL_GRACE_S = 10.0
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
  """This process's environment plus ``env``, forced to CPU with ``devices_per_process`` devices
  (an inherited device-count flag, e.g. from a test conftest, is replaced)."""
  child = {**os.environ, **(env or {})}
  child["JAX_PLATFORMS"] = "cpu"
  child["PYTHONUNBUFFERED"] = "1"
  kept = [f for f in child.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  child["XLA_FLAGS"] = " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
  return child


def launch(
  num_processes: int,
  main_args: Sequence[str],
  devices_per_process: int = 1,
  env: Mapping[str, str] | None = None,
  timeout: float | None = None,
  command: Sequence[str] = MAIN_COMMAND,
  echo: bool = False,
) -> list[subprocess.CompletedProcess]:
  """Starts ``num_processes`` processes of ``command + main_args + distributed flags`` and waits.

  Args:
    main_args: arguments for ``mammojax.main`` (``--config=... --workdir=...``).
    env: extra environment variables for every process.
    timeout: seconds; when exceeded, all processes are killed and ``TimeoutExpired`` is raised
      with the output so far.
    command: the program before ``main_args``; ``python -m mammojax.main`` by default.
    echo: also print every output line, prefixed with ``[pI]``, as it arrives.

  Returns:
    One ``CompletedProcess`` per process id; ``stdout`` holds its stdout and stderr interleaved.
    If a process fails, the others are terminated (their return codes show it).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(
      f"num_processes={num_processes} and devices_per_process="
      f"{devices_per_process} must both be >= 1"
    )
  address = f"127.0.0.1:{free_port()}"
  child_env = process_env(devices_per_process, env)
  argvs = [
    [
      *command,
      *main_args,
      f"--coordinator_address={address}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
    ]
    for i in range(num_processes)
  ]
  print_lock = threading.Lock()
  outputs: list[list[str]] = [[] for _ in range(num_processes)]
  procs: list[subprocess.Popen] = []
  readers: list[threading.Thread] = []

  def read(i: int, stream) -> None:
    for line in stream:  # Text mode: a progress bar's '\r' also ends a line.
      outputs[i].append(line)
      if echo:
        with print_lock:
          sys.stdout.write(f"[p{i}] {line}")
          sys.stdout.flush()
    stream.close()

  def forward(signum, frame) -> None:
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = _install_handlers(forward)
  try:
    for i, argv in enumerate(argvs):
      # A session of their own: a Ctrl-C in the terminal reaches only the launcher, which
      # forwards it once, instead of every process receiving it twice.
      proc = subprocess.Popen(
        argv,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
      )
      procs.append(proc)
      thread = threading.Thread(target=read, args=(i, proc.stdout), daemon=True)
      thread.start()
      readers.append(thread)
    _wait(procs, timeout, outputs)
  finally:
    for p in procs:  # Only after an exception (timeout, launcher interrupted) is any alive.
      if p.poll() is None:
        p.kill()
        p.wait()
    for thread in readers:
      thread.join(timeout=5)
    _restore_handlers(previous)
  return [
    subprocess.CompletedProcess(argvs[i], p.returncode, "".join(outputs[i]), None)
    for i, p in enumerate(procs)
  ]


def _wait(procs: list[subprocess.Popen], timeout: float | None, outputs: list[list[str]]) -> None:
  """Waits for all processes; stops the rest when one fails; raises on timeout."""
  deadline = None if timeout is None else time.monotonic() + timeout
  kill_at = None
  while None in [p.poll() for p in procs]:  # Polls every process (any() would stop early).
    now = time.monotonic()
    if deadline is not None and now > deadline:
      raise subprocess.TimeoutExpired(
        procs[0].args,
        timeout,
        output="".join(f"[p{i}] {line}" for i, lines in enumerate(outputs) for line in lines),
      )
    failed = any(p.returncode not in (None, 0) for p in procs)
    if failed and kill_at is None:
      for p in procs:
        if p.poll() is None:
          p.terminate()
      kill_at = now + KILL_GRACE_S
    if kill_at is not None and now > kill_at:
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.05)


def _install_handlers(handler):
  """Installs ``handler`` for SIGINT/SIGTERM; returns the previous handlers (None off the main
  thread, where Python allows no signal handlers)."""
  if threading.current_thread() is not threading.main_thread():
    return None
  return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(previous) -> None:
  if previous is not None:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def exit_code(results: Sequence[subprocess.CompletedProcess]) -> int:
  """0 when every process succeeded; else the first process's own failure code, or 128+N when
  the failures were all deaths by signal N (e.g. the survivors the launcher stopped)."""
  codes = [r.returncode for r in results]
  failed = [c for c in codes if c > 0] or [128 - c for c in codes if c < 0]
  return failed[0] if failed else 0


def main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(
    description="Run mammojax.main as N jax.distributed CPU processes on this machine.",
    usage="%(prog)s --num_processes=N [--devices_per_process=K] -- ARGS_FOR_MAMMOJAX_MAIN",
  )
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument(
    "--devices_per_process", type=int, default=1, help="fake CPU devices per process (default 1)"
  )
  parser.add_argument("--timeout", type=float, default=None, help="seconds; default none")
  parser.add_argument(
    "main_args", nargs=argparse.REMAINDER, help="after '--': arguments for python -m mammojax.main"
  )
  args = parser.parse_args(argv)
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  if not main_args:
    parser.error(
      "give the arguments for mammojax.main after '--', e.g. "
      "-- --config=configs/imgfeatalign.py:smoke --workdir=/tmp/mp"
    )
  try:
    results = launch(
      args.num_processes, main_args, args.devices_per_process, timeout=args.timeout, echo=True
    )
  except subprocess.TimeoutExpired:
    print(f"[launch] timed out after {args.timeout} s; killed all processes", file=sys.stderr)
    return 124
  for i, r in enumerate(results):
    print(f"[launch] process {i} exited with {r.returncode}", file=sys.stderr)
  return exit_code(results)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
