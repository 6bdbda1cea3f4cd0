"""Console logging for the entry points: INFO for bltjax, WARNING and up for chatty libraries."""

import logging

_QUIET = ("/orbax/", "/grain/", "/jax/_src/", "/absl/")


class _LibraryInfoFilter(logging.Filter):
  """Orbax logs every save/restore step at INFO through absl; keep only its warnings."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(q in record.pathname for q in _QUIET)


def quiet_libraries():
  f = _LibraryInfoFilter()
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(f)
  logging.getLogger("absl").addFilter(f)
