"""What every ``python -m mammojax.*`` command shares: console logging, in-process flag parsing
and one-line user errors."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# A job stopped by SIGTERM after saving its state (128 + SIGTERM, what a shell reports for a job
# the signal killed): schedulers that requeue preempted jobs by exit code recognise it.
EXIT_PREEMPTED = 143


class InputError(Exception):
  """Base of mammojax's own errors in what the user gave (a file, flag, workdir, config field or
  checkpoint): a command ends on one with one line and exit code 2. Subclass it together with the
  builtin type that callers already catch (``class XError(InputError, RuntimeError)``)."""


# Errors in what the user gave: one line and exit code 2 (see exit_code_and_message).
INPUT_ERRORS = (
  InputError,
  ValueError,
  KeyError,
  FileNotFoundError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)


def one_line(text: object) -> str:
  """``text`` with every run of whitespace, newlines included, collapsed to one space."""
  return " ".join(str(text).split())


def exit_code_and_message(error: BaseException) -> tuple[int, str]:
  """How a command reports an exception that ended it: ``(2, message)`` for an error in the input
  (:data:`INPUT_ERRORS`; a ``KeyError`` only when it carries a sentence, not a bare key that some
  lookup missed), else ``(1, 'Type: message')``. The message is one line."""
  if isinstance(error, KeyError):
    text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else ""
    if " " in text.strip():
      return EXIT_BAD_INPUT, one_line(text)
  elif isinstance(error, INPUT_ERRORS):
    return EXIT_BAD_INPUT, one_line(error) or type(error).__name__
  detail = one_line(error)
  return EXIT_FAILURE, f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _save_traceback(error: BaseException) -> str | None:
  """Writes ``error``'s traceback to a temporary file and returns its path (None if it cannot)."""
  try:
    with tempfile.NamedTemporaryFile(
      "w", prefix="mammojax-traceback-", suffix=".txt", delete=False
    ) as f:
      traceback.print_exception(error, file=f)
      return f.name
  except OSError:
    return None


def report_error(error: BaseException, verbose: bool) -> NoReturn:
  """Ends a command on ``error``: ``error: <one line>`` on stderr and the exit code of
  :func:`exit_code_and_message`; the traceback too with ``verbose``. Without it, a failure
  (exit 1) names a temporary file holding its traceback, so a long run need not be repeated."""
  code, message = exit_code_and_message(error)
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
  elif code == EXIT_FAILURE:
    saved = _save_traceback(error)
    where = f"traceback in {saved}; " if saved else ""
    message += f" ({where}rerun with --verbose to print the traceback)"
  fail(message, code)


def setup_console_logging() -> None:
  """mammojax's own messages at INFO; orbax/absl chatter (every checkpoint step) at WARNING, so
  the console stays readable next to the progress bar."""
  logging.getLogger("mammojax").setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.WARNING)


class CommandLogFormatter(logging.Formatter):
  """Log lines as they are, except that ERROR records start with ``error: `` like :func:`fail`'s
  lines, so a command that reports through ``logging`` ends a user error the same way."""

  def format(self, record: logging.LogRecord) -> str:
    text = super().format(record)
    return f"error: {text}" if record.levelno >= logging.ERROR else text


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


def _unknown_field_message(error: AttributeError | KeyError, argv: Sequence[str]) -> str:
  """One line for ml_collections' error on ``--config.a.b=value`` when the config has no field
  ``b`` (``'b'`` and a suggestion): names the flags that set it."""
  if isinstance(error.__context__, KeyError):  # ConfigDict's AttributeError wraps a KeyError
    error = error.__context__
  detail = one_line(error.args[0] if error.args else error)
  key = detail.split("'")[1] if detail.count("'") >= 2 else ""
  names = [arg[2:].partition("=")[0] for arg in argv[1:] if arg.startswith("--")]
  culprits = [f"--{n}" for n in names if key and "." in n and n.split(".")[-1] == key]
  where = ", ".join(culprits) or "a --config override"
  return f"{where}: no such config field ({detail}); see the config file for its fields"


def _refuse_unloadable_configs(values: flags.FlagValues) -> None:
  """Ends the command when a ``--config`` file did not load: ml_collections keeps the error in a
  stand-in config and raises it only when the command first reads the config."""
  for name in values:
    config = values[name].value
    if type(config).__name__ == "_ErrorConfig":  # ml_collections' stand-in; private name
      error = vars(config).get("_error")
      filename = getattr(values[name], "config_filename", None)
      if filename and not os.path.exists(filename):
        fail(f"--{name}: config file {filename} does not exist")
      fail(f"--{name}: config file {filename} does not load ({one_line(error)})")


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_program(
  main: Callable[[list[str]], Any],
  define_flags: Callable[[], None] | None = None,
  positional_args: bool = False,
) -> None:
  """The entry of every ``python -m mammojax.<command>``: defines the command's flags (on the
  global flags: they exist only in the program, not on import), parses them, refuses
  positional arguments unless the command takes some, sets up console logging and runs
  ``main(argv)``. ``--help`` lists every flag and exits 0 (absl's own exit code for help is 1).

  Errors end the command with one line on stderr (:func:`report_error`): a bad flag, flag value
  or config file, or an :data:`INPUT_ERRORS` exception, with exit code 2; any other exception
  with 1. ``--verbose`` (defined here for every command) prints the traceback as well.
  """
  if define_flags is not None:
    define_flags()
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "On an error, print the Python traceback too.")

  def verbose() -> bool:
    return bool(flags.FLAGS["verbose"].value) or "--verbose" in sys.argv[1:]

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      positional = flags.FLAGS(argv)
    except flags.Error as e:
      if verbose():
        traceback.print_exc()
      fail(f"{one_line(e)} (see --help)")
    except (AttributeError, KeyError) as e:  # an override of a field the config lacks
      if verbose():
        traceback.print_exc()
      fail(_unknown_field_message(e, argv))
    except Exception as e:
      report_error(e, verbose())
    _refuse_unloadable_configs(flags.FLAGS)
    return positional

  def checked_main(argv: list[str]) -> Any:
    if not positional_args:
      refuse_positional(argv[1:])
    setup_console_logging()
    try:
      return main(argv)
    except Exception as e:
      report_error(e, verbose())

  try:
    app.run(checked_main, flags_parser=parse_flags)
  except SystemExit as e:
    if e.code == 1 and any(arg in HELP_FLAGS for arg in sys.argv[1:]):
      raise SystemExit(0) from None
    raise
