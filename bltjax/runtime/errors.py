"""Errors a user can act on. The command-line tools print these as one line and exit 1 (a
traceback is for bugs, or with --verbose); library callers catch them by class."""


class Error(Exception):
  """Base of the expected errors: the message says what is wrong and what to do."""


class CheckpointError(Error):
  """A checkpoint cannot be read (missing, truncated or inconsistent files); names it."""


class WorkdirLocked(Error):
  """Another live run holds the workdir (or output directory); names the holder."""


class TrainingDiverged(Error):
  """The loss or gradients became non-finite (or too many steps were skipped in a row); nothing
  non-finite was applied to the params or saved."""
