"""Tests for triplane3d/preemption.py: signals become a stop flag, handlers are chained and
restored, a second Ctrl-C quits at once. (Agreement across real processes, and the save that
follows, are tested with the checkpointer in test_checkpoint.py.)"""

import os
import signal

import pytest

from triplane3d import preemption


def test_guard_sets_flag_chains_and_restores_handler(devices):
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
  try:
    guard = preemption.PreemptionGuard()
    with guard:
      assert not guard.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)
      assert guard.signalled and guard.should_stop(2) and guard.should_stop(3)
    assert seen == [signal.SIGTERM]  # The previous Python handler was chained.
    os.kill(os.getpid(), signal.SIGTERM)  # Restored: goes to the old handler only.
    assert seen == [signal.SIGTERM, signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_first_ctrl_c_stops_cleanly_second_quits_at_once():
  previous = signal.getsignal(signal.SIGINT)
  guard = preemption.PreemptionGuard()
  with guard:
    os.kill(os.getpid(), signal.SIGINT)  # No KeyboardInterrupt: a save is requested instead.
    assert guard.signalled and guard.should_stop(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is previous  # Restored on exit.
