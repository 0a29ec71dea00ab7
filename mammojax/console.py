"""Console logging for the command-line programs."""

import logging

from absl import logging as absl_logging


def setup_console_logging() -> None:
  """mammojax's own messages at INFO; orbax/absl chatter (every checkpoint step) at WARNING, so
  the console stays readable next to the progress bar."""
  logging.getLogger("mammojax").setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.WARNING)
