"""What a user sees in the terminal: our own lines, not the libraries' INFO chatter.

Orbax logs a dozen INFO lines per save or restore, grain and tfds more, and jax says at every
start that it found no TPU. `quiet_libraries()` drops INFO and below from those libraries in
absl's handler; their warnings and errors still show. Every command-line entry point calls it.
"""

from __future__ import annotations

import logging as std_logging

from absl import logging

_NOISY = ('/orbax/', '/grain/', '/etils/', '/tensorflow_datasets/', '/jax/_src/xla_bridge')


class _QuietLibraries(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(p in record.pathname for p in _NOISY)
    return record.levelno >= std_logging.WARNING or not noisy


def quiet_libraries() -> None:
  """Installs the filter on absl's handler (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
