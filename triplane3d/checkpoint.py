"""Checkpoints: the train state plus the data-iterator state, resume, and preemption.

`Checkpointer` wraps one orbax `CheckpointManager` under `<workdir>/checkpoints`. Each step
directory holds two items: 'state' (the state pytree of sharded jax.Arrays; every process
writes its own shards, so it is multi-host safe) and, when given, 'data' (the grain iterator
state, one small JSON file per process). Saves are asynchronous (arrays are copied to host,
then written in a background thread), the last `keep` are kept, and a save is atomic: orbax
writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete (on GCS, a
commit_success.txt marker plays that role), so a crash mid-save never leaves something that
`restore_latest` would pick up.

"Resume equals uninterrupted" rests on one convention, which the trainer follows:
`save(step, state, it)` is called after exactly `step` batches have been drawn from `it` and
applied to `state` (so `state` holds step `step`). Restoring both puts the iterator right
before batch `step`, i.e. the very next one. Per-step randomness should be derived as
`jax.random.fold_in(key, step)` (or live in `state`), never from Python-side counters.

A loop (the trainer's shape):

  with Checkpointer(workdir, keep=3, save_every=1000) as ckpt, PreemptionGuard() as guard:
    restored = ckpt.restore_latest(abstract_state, data_iter)
    step, state = restored if restored else (0, init_state())
    while step < num_steps:
      state = train_step(state, next(data_iter))
      step += 1
      if guard.should_stop(step):        # every host gets the same answer
        ckpt.save(step, state, data_iter, force=True)
        break
      ckpt.save(step, state, data_iter)  # no-op unless step % save_every == 0
    else:
      ckpt.save(step, state, data_iter, force=True)
  # leaving the `with` waits for the asynchronous save; then exit 0.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from triplane3d import sharding

STATE, DATA = 'state', 'data'


class Checkpointer:
  """Saves and restores (state, data-iterator state) under `<workdir>/<subdir>`.

  Every process must make the same calls with the same steps (orbax synchronises hosts
  inside `save`, `restore_latest` and `wait`).
  """

  def __init__(
    self,
    workdir: str | epath.PathLike,
    *,
    keep: int = 3,
    save_every: int = 1000,
    async_save: bool = True,
    subdir: str = 'checkpoints',
  ):
    self.directory = epath.Path(workdir).absolute() / subdir
    self.save_every = int(save_every)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      # We decide when to save (save()), so orbax's own policy (which also saves the first
      # step it sees, whatever the interval) is bypassed with force=True.
      save_interval_steps=1,
      enable_async_checkpointing=async_save,
      # Leftovers of a save that died half-way are deleted at start-up (they are ignored
      # anyway: only finalised step directories count as checkpoints).
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: ocp.StandardCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
      },
    )

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None, force: bool = False) -> bool:
    """Starts saving `state` (and `data_iter`'s position) as `step`; returns whether it did.

    Skipped unless `step` is a multiple of `save_every` or `force` is set, and when `step` is
    already saved (e.g. the final save right after a periodic one). The iterator state is
    read now, synchronously, so the caller may keep iterating; the arrays are written in the
    background (call `wait()` before reading the files from elsewhere).
    """
    if not (force or step % self.save_every == 0) or step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info('Saving checkpoint step %d to %s.', step, self.directory)
    return saved

  def restore_latest(self, abstract_state: Any, data_iter: Any = None) -> tuple[int, Any] | None:
    """Restores the newest checkpoint onto `abstract_state`'s shardings, or returns None.

    `abstract_state`: the state pytree as jax.ShapeDtypeStructs with `.sharding` (or arrays,
    whose shardings are used), e.g. `sharding.abstract_with_shardings(jax.eval_shape(...),
    shardings)`; each host reads only its own shards. `data_iter`: a grain iterator whose
    position is set to the saved one (so its next element is the batch after `step`).
    Returns `(step, state)`. Raises ValueError naming every mismatched path when the saved
    tree does not fit `abstract_state`.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    self._check_tree(step, abstract_state)
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      if not (self.directory / str(step) / DATA).exists():
        raise ValueError(
          f'Checkpoint {self.directory / str(step)} has no data-iterator state, so the data '
          'cannot resume where it stopped; it was saved without data_iter. Pass '
          'data_iter=None to restore only the state (the data restarts from the beginning).'
        )
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info('Restored checkpoint step %d from %s.', step, self.directory)
    return step, restored[STATE]

  def _check_tree(self, step: int, abstract_state: Any) -> None:
    """Compares paths and shapes of the saved tree with the expected one, before reading."""
    _check_shapes(
      _shapes(self._manager.item_metadata(step)[STATE]),
      _shapes(abstract_state),
      f'Checkpoint {self.directory / str(step)} does not match the state this run builds',
      'It was written by a different model / optimiser config. Resume with the config that '
      'wrote it, or start from a fresh --workdir.',
    )

  def wait(self) -> None:
    """Blocks until every started save is on disk (and old checkpoints are pruned)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(
  workdir: str | epath.PathLike, step: int | None = None, config: Any = None
) -> tuple[int, dict]:
  """The model parameters of a run's checkpoint, on one device, for tools outside the trainer.

  Reads only the 'params' subtree ({'backbone', 'decoder'[, 'mlp']}) of
  `<workdir>/checkpoints/<step>/state`, not the optimiser state, onto the first local device
  whatever mesh wrote it. Unlike `Checkpointer`, it never writes to the workdir (no directory
  creation, no clean-up of unfinished saves), so it is safe beside a run that is still
  training. One process only.

  Args:
    workdir: the training run's directory (local or gs://).
    step: the checkpoint step; None: the latest finished one.
    config: the run's config, optional. When given, the saved parameter tree is checked
      against the one `Prior3D.from_config(config)` builds (a ValueError names every
      differing path) and arrays are read in that model's dtypes.

  Returns:
    `(step, params)`: the step read and the parameter pytree of jax.Arrays.

  Raises:
    FileNotFoundError: no finished checkpoint under `workdir`, or none for `step`.
    ValueError: `config` builds a different parameter tree than the one saved.
  """
  root = epath.Path(workdir).absolute() / 'checkpoints'
  steps = sorted(ocp.utils.checkpoint_steps(root)) if root.is_dir() else []
  if not steps:
    raise FileNotFoundError(
      f'no finished checkpoint under {root}; is {workdir} a training run that saved one?'
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f'no checkpoint for step {step} under {root}; have steps {steps}.')
  path = root / str(step) / STATE
  # The handler rather than a Checkpointer: the item directory has no step-level metadata
  # file (the CheckpointManager keeps that one level up), which a Checkpointer warns about.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(path)
    saved = getattr(meta, 'tree', meta)['params']
    if config is None:
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
    else:
      from triplane3d.models.prior3d import Prior3D, unbox

      model = Prior3D.from_config(config)
      abstract = unbox(jax.eval_shape(model.init, jax.random.key(0)))
      _check_shapes(
        _shapes(saved),
        _shapes(abstract),
        f'Checkpoint {path} does not hold the parameters this config builds',
        'Use the config (and the --config.* overrides) the run was trained with.',
      )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=device, global_shape=s.shape, dtype=s.dtype),
      abstract,
    )
    restored = handler.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item={'params': abstract}, restore_args={'params': restore_args}, partial_restore=True
      ),
    )
  finally:
    handler.close()
  logging.info('Restored the parameters of step %d from %s.', step, path)
  return step, restored['params']


def _check_shapes(saved: dict, want: dict, what: str, advice: str) -> None:
  """Raises ValueError listing every difference between two `_shapes` dicts, if any."""
  lines = _mismatches(saved, want)
  if lines:
    raise ValueError(
      f'{what} ({len(lines)} problems):\n'
      + '\n'.join(lines[:50])
      + ('\n  ...' if len(lines) > 50 else '')
      + f'\n{advice}'
    )


def _mismatches(saved: dict, want: dict) -> list[str]:
  """One line per difference between two `_shapes` dicts (empty when they agree)."""
  missing = sorted(set(want) - set(saved))
  extra = sorted(set(saved) - set(want))
  shapes = sorted(p for p in set(want) & set(saved) if want[p] != saved[p])
  lines = [f'  missing from the checkpoint: {p} (expected shape {want[p]})' for p in missing]
  lines += [f'  only in the checkpoint: {p} (shape {saved[p]})' for p in extra]
  lines += [f'  shape mismatch: {p}: expected {want[p]}, found {saved[p]}' for p in shapes]
  return lines


def _as_abstract(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return x


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      # Typed PRNG keys are stored as their raw key data (e.g. shape (2,) for threefry).
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    # orbax metadata turns NamedTuple fields and tuple indices into plain keys: compare names.
    out[sharding.path_str(path)] = tuple(np.shape(leaf))
  return out


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
      # Python only delivers signals to the main thread; request_stop() still works.
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

  def request_stop(self) -> None:
    """Sets the local flag as a signal would (for tests, or other stop conditions)."""
    self._flag = True

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
