"""Device prefetch: the next batches assembled and already on the devices while a step runs.

`DevicePrefetch(it, put, size)` wraps the host iterator `it` (`pipeline.create`): a background
thread draws batches from `it`, places each with `put` (`sharding.to_global`: global
jax.Arrays on the batch sharding) and keeps up to `size` of them ahead of the consumer. The
host-side assembly and the host→device copy of the next batches then overlap the step in
flight, and a slow batch (a checkpoint save, an image step) is absorbed by the queue.

Checkpoints stay exact. The wrapped iterator is up to `size` batches ahead of what the model
has consumed, so its own state would skip them on resume. Each batch therefore travels with
the wrapped iterator's state right after it was drawn (= before the next one was drawn), and
`get_state()` is that state of the last batch handed out: the position of the first batch
not yet consumed, exactly what a plain iterator would say after the same number of batches.
`set_state()` stops the thread, drops the queue and sets the wrapped iterator, so the next
batch is the one after the saved position. It is a grain `DatasetIterator`, so
`grain.checkpoint.CheckpointSave/CheckpointRestore` (the trainer's `Checkpointer`) save and
restore it like the plain one; the saved states are interchangeable between the two.

`size=0` is off: `next()` draws and places synchronously, and the state is the wrapped one's.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grain

# How often a producer waiting for a free slot checks whether it was told to stop.
_POLL_S = 0.1


class DevicePrefetch(grain.DatasetIterator):
  """`put(next(it))`, computed up to `size` batches ahead in a background thread.

  Args:
    it: a checkpointable grain iterator of host batches (dicts of numpy arrays, leaves
      (b, ...) with b = global batch / process_count).
    put: host batch → device batch, e.g. `lambda b: sharding.to_global(b, mesh)` (global
      jax.Arrays, leaves (B, ...) sharded over the mesh's batch axes).
    size: batches kept ahead of the consumer (`data.device_prefetch`); 0: none, no thread.

  `waited_s` adds up the seconds `next` blocked for a batch that was not ready yet (with size
  0, every draw): the input stalls a consumer sees, without the thread hand-overs of a batch
  that was waiting in the queue.

  Only one thread may call `next`, `get_state`, `set_state` and `close` (grain's rule); the
  producer thread is the only one that touches `it` while it runs. Call `close()` when done:
  it stops the thread, then closes `it` (its worker processes).
  """

  def __init__(self, it: grain.DatasetIterator, put: Callable[[Any], Any], size: int):
    super().__init__(it)
    self._it, self._put, self._size = it, put, size
    self._thread: threading.Thread | None = None
    # The producer's stop flag, free slots (size - batches ahead) and output: `_start` makes
    # them afresh for each producer.
    self._stop = threading.Event()
    self._slots = threading.Semaphore(0)
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._state: Any = None  # While the thread runs: `it`'s state after the last batch out.
    self.waited_s = 0.0
    if not isinstance(size, int) or size < 0:
      self._closed = True  # Refused: garbage collection must not close the caller's `it`.
      raise ValueError(
        f'data.device_prefetch must be a number of batches >= 0 (0: off), got {size!r}.'
      )

  @property
  def _cycle_length(self) -> int | None:
    # The worker count of an mp_prefetch pipeline, which `checkpoint._iterator_workers` reads
    # (instead of asking for the state, which would start the workers) to name a resume with
    # another data.num_workers: the wrapped pipeline's.
    return getattr(self._it, '_cycle_length', None)

  def __next__(self) -> Any:
    self._assert_not_closed()
    if self._size == 0:
      start = time.perf_counter()
      batch = self._put(next(self._it))
      self.waited_s += time.perf_counter() - start
      return batch
    if self._thread is None:
      self._start()
    start, ready = time.perf_counter(), not self._queue.empty()
    batch, state, error = self._queue.get()
    if not ready:
      self.waited_s += time.perf_counter() - start
    if error is not None:
      # The producer stopped at the error, after every batch it drew was handed out: `it`'s
      # own state is the position again.
      self._join()
      raise error
    self._slots.release()
    self._state = state
    return batch

  def get_state(self) -> dict[str, Any]:
    """The wrapped iterator's state before the first batch not yet handed out."""
    if self._thread is None:
      return self._it.get_state()
    return copy.deepcopy(self._state)

  def set_state(self, state: dict[str, Any]) -> None:
    """Drops the batches drawn ahead and sets the wrapped iterator to `state`."""
    self._join()
    self._it.set_state(state)

  def close(self) -> None:
    """Stops the producer (after the batch it is drawing), then closes the wrapped iterator."""
    self._join()
    super().close()

  def _start(self) -> None:
    # Taken before the thread touches `it`: what get_state says until a batch is handed out.
    self._state = copy.deepcopy(self._it.get_state())
    self._stop = threading.Event()
    self._slots = threading.Semaphore(self._size)
    self._queue = queue.SimpleQueue()
    # The thread holds the iterator and the queue, not `self`: an unclosed wrapper can still
    # be garbage-collected, and grain's __del__ then closes it (stopping the thread).
    args = (self._it, self._put, self._stop, self._slots, self._queue)
    self._thread = threading.Thread(target=_produce, args=args, name='device_prefetch')
    self._thread.daemon = True  # Never keeps a finished (or killed) run's process alive.
    self._thread.start()

  def _join(self) -> None:
    """Stops the producer and forgets what it drew ahead; `it` is then free to use."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    self._state = None
    self._queue = queue.SimpleQueue()  # Its batches (device memory) are released.


def _produce(it, put, stop: threading.Event, slots: threading.Semaphore, out) -> None:
  """Draws `put(next(it))` into `out` with `it`'s state after it, while a slot is free.

  An error (StopIteration included) is queued for the consumer to raise, and ends the thread.
  """
  while True:
    while not slots.acquire(timeout=_POLL_S):
      if stop.is_set():
        return
    if stop.is_set():
      return
    try:
      batch = put(next(it))
      out.put((batch, copy.deepcopy(it.get_state()), None))
    except Exception as e:  # Raised in the consumer's thread, with its traceback.
      out.put((None, None, e))
      return
