"""The errors a user can act on, as opposed to bugs.

`launch/train.py` prints these as one message, without a traceback, and
exits with the code of the class (`exit_code`); any other exception is an
internal error and keeps its traceback.
"""


class UserError(Exception):
  """An error whose message says what is wrong, where, and how to fix it."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """The config (or the command line, or the workdir it names) cannot be run.

  Raised before anything is written to the workdir. Exit code 2.
  """
  exit_code = 2


class TrainingDiverged(UserError, FloatingPointError):
  """Training produced non-finite values; the run stopped without saving
  them. The workdir keeps its last finite checkpoint. Exit code 3."""
  exit_code = 3
