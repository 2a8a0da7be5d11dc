"""Preemption: SIGTERM (a preemption notice) or Ctrl-C becomes a stop that every host agrees on.

The trainer checks `PreemptionGuard.should_stop(step)` after each step; when it says so, it
saves a checkpoint of that step and exits cleanly (see `checkpoint` for the loop's shape).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Turns SIGTERM (a preemption notice) or Ctrl-C into a flag that every host agrees on.

  The first SIGINT (Ctrl-C) is treated like SIGTERM: save at the next sync step and exit
  cleanly, instead of losing everything since the last checkpoint. A second SIGINT raises
  KeyboardInterrupt at once (Python's default, which is not chained on the first).

  Use as a context manager around the loop: it installs a handler for `signals` that only
  sets a flag (the step in flight finishes normally) and restores the previous handlers on
  exit. A previous Python handler is chained (called after ours); a non-Python one (e.g.
  jax's own preemption notifier, installed in C++ by `jax.distributed.initialize`) cannot be
  and is replaced by SIG_DFL on exit.

  `should_stop(step)` must be called by every process at every step. With one process it
  returns the local flag. With several it all-gathers the flags every `sync_every_steps`
  steps (`multihost_utils.process_allgather` of one int32: a tiny collective) and returns
  True on every host as soon as any host was signalled, so all hosts save the same step and
  exit together. We do not use `multihost_utils.reached_preemption_sync_point`: it only
  works once `jax.distributed` is initialised with its preemption service, which catches
  SIGTERM in C++ (invisible to, and overridden by, a Python handler), and it does nothing
  for a single-process run; the all-gather is explicit, works on every backend including
  CPU+gloo, and is tested here with real processes.
  """

  def __init__(
    self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), sync_every_steps: int = 1
  ):
    self.signals = tuple(signals)
    self.sync_every_steps = max(1, int(sync_every_steps))
    self._flag = False
    self._agreed = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      # Python only delivers signals to the main thread.
      logging.warning('PreemptionGuard outside the main thread: no signal handler installed.')
      return self
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if prev is None else prev)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    # Keep the handler tiny: it runs between two bytecodes of whatever the loop is doing.
    if signum == signal.SIGINT:
      if self._flag:
        raise KeyboardInterrupt('second Ctrl-C: stopping without saving')
      self._flag = True
      logging.warning('Ctrl-C: will checkpoint and stop at the next sync step (again: quit now).')
      return  # Python's own SIGINT handler would raise KeyboardInterrupt: not chained.
    self._flag = True
    logging.warning('Received signal %d: will checkpoint and stop at the next sync step.', signum)
    prev = self._previous.get(signum)
    if callable(prev):
      prev(signum, frame)

  @property
  def signalled(self) -> bool:
    """Whether this process was signalled (no cross-host agreement)."""
    return self._flag

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every process."""
    if self._agreed:
      return True
    if jax.process_count() == 1:
      self._agreed = self._flag
    elif step % self.sync_every_steps == 0:
      flags = multihost_utils.process_allgather(np.int32(self._flag))
      self._agreed = bool(np.max(flags))
    return self._agreed
