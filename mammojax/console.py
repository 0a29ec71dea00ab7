"""What every ``python -m mammojax.*`` command shares: console logging, in-process flag parsing
and one-line user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

EXIT_BAD_INPUT = 2
# A job stopped by SIGTERM after saving its state (128 + SIGTERM, what a shell reports for a job
# the signal killed): schedulers that requeue preempted jobs by exit code recognise it.
EXIT_PREEMPTED = 143


def setup_console_logging() -> None:
  """mammojax's own messages at INFO; orbax/absl chatter (every checkpoint step) at WARNING, so
  the console stays readable next to the progress bar."""
  logging.getLogger("mammojax").setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.WARNING)


def define_experiment_config(values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """``--config=configs/X.py[:variant]`` with ``--config.a.b=value`` overrides, as every command
  that runs an experiment takes it."""
  return config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, optionally with a variant: configs/X.py:smoke. "
    "Override any field with --config.a.b=value.",
    flag_values=values,
    lock_config=True,
  )


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
  """Ends a command on a user error: one line on stderr, no traceback."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(code)


def command_flags(
  define_flags: Callable[[flags.FlagValues], None], argv: Sequence[str], program: str
) -> tuple[flags.FlagValues, list[str]]:
  """A command's flags parsed from ``argv`` (without the program name) into a ``FlagValues`` of
  their own, so the command can run in-process (tests, notebooks) beside other commands whose
  flags share names; also the positional arguments. A bad flag ends the command with
  :func:`fail`."""
  values = flags.FlagValues()
  define_flags(values)
  try:
    positional = values([program, *argv])[1:]
  except flags.Error as e:
    fail(f"{e} (see python -m {program} --help)")
  return values, positional


def refuse_positional(arguments: Sequence[str]) -> None:
  """Ends a command whose every input is a flag when it was given positional ``arguments``."""
  if arguments:
    fail(f"unexpected arguments {list(arguments)}; every input is a flag (see --help)")


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_program(
  main: Callable[[list[str]], Any],
  define_flags: Callable[[], None] | None = None,
  positional_args: bool = False,
) -> None:
  """The entry of every ``python -m mammojax.<command>``: defines the command's flags (on the
  global flags: they exist only in the program, not on import), parses them, refuses
  positional arguments unless the command takes some, sets up console logging and runs
  ``main(argv)``. ``--help`` lists every flag and exits 0 (absl's own exit code for help is 1)."""
  if define_flags is not None:
    define_flags()

  def checked_main(argv: list[str]) -> Any:
    if not positional_args:
      refuse_positional(argv[1:])
    setup_console_logging()
    return main(argv)

  try:
    app.run(checked_main)
  except SystemExit as e:
    if e.code == 1 and any(arg in HELP_FLAGS for arg in sys.argv[1:]):
      raise SystemExit(0) from None
    raise
