"""Checkpoints: the train state plus the data-iterator state, and resume.

`Checkpointer` wraps one orbax `CheckpointManager` under `<workdir>/checkpoints`. Each step
directory holds two items: 'state' (the state pytree of sharded jax.Arrays; every process
writes its own shards, so it is multi-host safe) and, when given, 'data' (the grain iterator
state, one small JSON file per process). Saves are asynchronous (arrays are copied to host,
then written in a background thread), the last `keep` are kept, and a save is atomic: orbax
writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete (on GCS, a
commit_success.txt marker plays that role), so a crash mid-save never leaves something that
`restore_latest` would pick up.

A run's directory (this module is the one place that names its parts):

  <workdir>/checkpoints/<step>/         finished checkpoints (orbax), the last `keep` of them
  <workdir>/checkpoints_corrupt/        checkpoints that failed to restore, set aside by
      <step>.<time>/ and <step>.<time>.txt    `restore_latest` with the error that stopped them
  <workdir>/config.json, config.txt     the run's resolved config (`run_config`): the
                                        machine-readable copy and a readable one
  <workdir>/metrics.jsonl, tb/, images/ logs and image grids (`summaries.Writer`)

A checkpoint that fails to restore (a truncated file, a disk error) does not block a resume:
`restore_latest` falls back to the newest one that restores, logs a warning naming each step
skipped and why, and moves the bad ones to `checkpoints_corrupt/`, outside orbax's reach (its
step listing and `keep` pruning only see `checkpoints/`), for inspection. Nothing is deleted.

"Resume equals uninterrupted" rests on one convention, which the trainer follows:
`save(step, state, it)` is called after exactly `step` batches have been drawn from `it` and
applied to `state` (so `state` holds step `step`). Restoring both puts the iterator right
before batch `step`, i.e. the very next one. Per-step randomness should be derived as
`jax.random.fold_in(key, step)` (or live in `state`), never from Python-side counters.

A loop (the trainer's shape; `preemption.PreemptionGuard` turns SIGTERM into a stop):

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

import contextlib
import errno
import json
import shutil
import time
import traceback
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE, DATA = 'state', 'data'
CHECKPOINTS = 'checkpoints'
CORRUPT = 'checkpoints_corrupt'
CONFIG_JSON, CONFIG_TEXT = 'config.json', 'config.txt'


class CorruptCheckpointError(ValueError):
  """A checkpoint that exists but cannot be read (truncated or damaged files)."""


class DataStateMismatchError(ValueError):
  """A checkpoint's data-iterator state does not fit this run's data pipeline."""


class DiskFullError(OSError):
  """No space left on the device while writing a checkpoint."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self) -> str:
    return self.strerror


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
    subdir: str = CHECKPOINTS,
  ):
    self.directory = epath.Path(workdir).absolute() / subdir
    self.corrupt_directory = epath.Path(workdir).absolute() / CORRUPT
    self._saving: int | None = None  # The step of the last save started, for error messages.
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

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    # Already failing: a second error from the pending save must not hide the first one.
    try:
      self.close()
    except Exception as e:
      logging.error(
        'While stopping on %s, finishing the checkpoint save failed too: %s', exc_type.__name__, e
      )

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def due(self, step: int) -> bool:
    """Whether `step` is a periodic checkpoint step (a multiple of `save_every`)."""
    return step % self.save_every == 0

  def save(self, step: int, state: Any, data_iter: Any = None, force: bool = False) -> bool:
    """Starts saving `state` (and `data_iter`'s position) as `step`; returns whether it did.

    Skipped unless `step` is `due` or `force` is set, and when `step` is already saved (e.g.
    the final save right after a periodic one). The iterator state is read now,
    synchronously, so the caller may keep iterating; the arrays are written in the
    background (call `wait()` before reading the files from elsewhere).
    """
    if not (force or self.due(step)) or step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    self._saving = step
    with self._disk_full_named(step):
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info('Saving checkpoint step %d to %s.', step, self.directory)
    return saved

  def restore_latest(self, abstract_state: Any, data_iter: Any = None) -> tuple[int, Any] | None:
    """Restores the newest checkpoint that can be read, or returns None when there is none.

    `abstract_state`: the state pytree as jax.ShapeDtypeStructs with `.sharding` (or arrays,
    whose shardings are used), e.g. `sharding.abstract_with_shardings(jax.eval_shape(...),
    shardings)`; each host reads only its own shards. `data_iter`: a grain iterator whose
    position is set to the saved one (so its next element is the batch after `step`).

    A checkpoint whose files cannot be read is skipped with a warning naming the step and
    the error, the next older one is tried, and once one restores the skipped ones are moved
    to `<workdir>/checkpoints_corrupt/` (see the module docstring).

    Returns `(step, state)`.

    Raises:
      ValueError: the saved tree does not fit `abstract_state` (every mismatched path named).
      DataStateMismatchError: the saved data-iterator state comes from a different pipeline
        (e.g. another data.num_workers).
      CorruptCheckpointError: no checkpoint restores (each step tried and its error named);
        nothing is moved then.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    failed: list[tuple[int, BaseException]] = []
    for step in steps:
      restored, error = self._try_restore(step, abstract_state, data_iter)
      if error is None:
        self._set_aside(failed)
        logging.info('Restored checkpoint step %d from %s.', step, self.directory)
        return step, restored
      failed.append((step, error))
      logging.warning(
        'CHECKPOINT STEP %d IS UNREADABLE, skipped: %s (%s). Trying an older one.',
        step, self.directory / str(step), _reason(error),
      )  # fmt: skip
    tried = '\n'.join(f'  step {s}: {_reason(e)}' for s, e in failed)
    raise CorruptCheckpointError(
      f'No checkpoint under {self.directory} can be restored; tried steps '
      f'{[s for s, _ in failed]}:\n{tried}\nNothing was moved or deleted. If the files are '
      f'damaged, move {self.directory} away to start afresh (or train in a fresh --workdir).'
    )

  def _try_restore(self, step: int, abstract_state: Any, data_iter: Any) -> tuple[Any, Any]:
    """(state, None) when `step` restores, (None, the error) when its files are unreadable.

    Errors that say the checkpoint does not fit this run (tree, data pipeline) are raised:
    an older checkpoint would not fit either.
    """
    error = None
    try:
      metadata = self._manager.item_metadata(step)[STATE]
    except Exception as e:  # orbax / TensorStore raise many types.
      metadata, error = None, e
    if error is None:
      self._check_tree(step, metadata, abstract_state)
      items = {STATE: ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        error = self._check_data_state(step, data_iter)
        items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = None
    if error is None:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
      except Exception as e:
        error = e
    if jax.process_count() > 1:
      # Each host reads its own shards: a damaged file may fail on one host only. All must
      # agree, or they would resume from different steps.
      failed = multihost_utils.process_allgather(np.int32(error is not None))
      if error is None and np.max(failed):
        restored, error = None, RuntimeError('unreadable on another host (see its log)')
    return restored, error

  def _check_data_state(self, step: int, data_iter: Any) -> BaseException | None:
    """Refuses a saved iterator state that this pipeline cannot take; returns read errors.

    grain's own failure for another worker count is a bare `KeyError: 'exhausted'`.
    """
    data_dir = self.directory / str(step) / DATA
    if not data_dir.exists():
      raise ValueError(
        f'Checkpoint {self.directory / str(step)} has no data-iterator state, so the data '
        'cannot resume where it stopped; it was saved without data_iter. Pass '
        'data_iter=None to restore only the state (the data restarts from the beginning).'
      )
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not (data_dir / name).exists():
      written = sorted(p.name for p in data_dir.glob('process_*-of-*.json'))
      if not written:
        return FileNotFoundError(f'no data-iterator state file in {data_dir}')
      raise DataStateMismatchError(
        f'Checkpoint {self.directory / str(step)} holds data-iterator states {written}, '
        f'none for this process ({name}): it was written by a different number of '
        'processes. Resume with the process count that wrote it.'
      )
    try:
      saved = json.loads((data_dir / name).read_text())
    except Exception as e:
      return e
    if not isinstance(saved, dict):
      return None  # Not a grain dataset iterator's state: let grain judge.
    current = _iterator_state(data_iter)
    was = _num_workers(saved)
    now = _num_workers(current) if current is not None else _iterator_workers(data_iter)
    if was is not None and now is not None and was != now:
      raise DataStateMismatchError(
        f'Checkpoint {self.directory / str(step)} was saved by a data pipeline with '
        f'data.num_workers={was}; this run has data.num_workers={now}. The saved position '
        'and the order of the batches depend on the worker count: resume with '
        f'--config.data.num_workers={was} (or train in a fresh --workdir).'
      )
    if isinstance(current, dict) and set(saved) != set(current):
      raise DataStateMismatchError(
        f'Checkpoint {self.directory / str(step)} holds a data-iterator state with keys '
        f"{sorted(saved)}; this run's data pipeline has {sorted(current)}. Resume with the "
        'data config that wrote it (or train in a fresh --workdir).'
      )
    return None

  def _set_aside(self, failed: list[tuple[int, BaseException]]) -> None:
    """Moves unreadable checkpoints out of orbax's directory, with the error beside them."""
    if not failed:
      return
    stamp = time.strftime('%Y%m%d-%H%M%S')
    if jax.process_index() == 0:
      self.corrupt_directory.mkdir(parents=True, exist_ok=True)
      for step, error in failed:
        src = self.directory / str(step)
        dst = self.corrupt_directory / f'{step}.{stamp}'
        try:
          src.rename(dst)
        except OSError as e:
          raise OSError(
            f'Checkpoint step {step} is unreadable ({_reason(error)}) and could not be moved '
            f'from {src} to {dst}: {e}. Move (or delete) it by hand, then resume.'
          ) from e
        (self.corrupt_directory / f'{step}.{stamp}.txt').write_text(
          f'step {step} failed to restore at {stamp}:\n'
          + ''.join(traceback.format_exception(error))
        )
        logging.warning('Moved unreadable checkpoint step %d to %s for inspection.', step, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('triplane3d_checkpoints_set_aside')
    self._manager.reload()  # Forget the moved steps: a later save of the same step is new.

  def _check_tree(self, step: int, metadata: Any, abstract_state: Any) -> None:
    """Compares paths and shapes of the saved tree with the expected one, before reading."""
    _check_shapes(
      _shapes(metadata),
      _shapes(abstract_state),
      f'Checkpoint {self.directory / str(step)} does not match the state this run builds',
      'It was written by a different model / optimiser config. Resume with the config that '
      'wrote it, or start from a fresh --workdir.',
    )

  def wait(self) -> None:
    """Blocks until every started save is on disk (and old checkpoints are pruned)."""
    with self._disk_full_named(self._saving):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  @contextlib.contextmanager
  def _disk_full_named(self, step: int | None) -> Iterator[None]:
    """Turns "no space left on device", however deep in orbax / TensorStore, into one line.

    Asynchronous saves report it later, from `wait()` or the next `save()`: both use this.
    The original traceback (hundreds of lines of TensorStore specs) is logged at debug level.
    """
    try:
      yield
    except DiskFullError:
      raise
    except Exception as e:
      if not _is_disk_full(e):
        raise
      logging.debug('Disk full while saving a checkpoint:', exc_info=e)
      try:
        free = f'{shutil.disk_usage(self.directory).free / 2**20:.0f} MiB free there now'
      except Exception:  # E.g. a gs:// workdir.
        free = 'free space unknown'
      last = self._manager.latest_step()
      kept = 'no checkpoint was finished'
      if last is not None:
        kept = f'the last finished checkpoint is step {last}'
      what = 'a checkpoint' if step is None else f'checkpoint step {step}'
      raise DiskFullError(
        f'Disk full: no space left on the device while writing {what} to {self.directory} '
        f'({free}); {kept}. Free space there (or lower train.keep_ckpts, or use a --workdir '
        'on a larger disk), then run the same command again to resume.'
      ) from None


def finished_steps(workdir: str | epath.PathLike) -> list[int]:
  """The steps of a run's finished checkpoints, oldest first, without opening a manager."""
  root = epath.Path(workdir).absolute() / CHECKPOINTS
  return sorted(ocp.utils.checkpoint_steps(root)) if root.is_dir() else []


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
    CorruptCheckpointError: the checkpoint's files cannot be read (truncated, damaged).
  """
  root = epath.Path(workdir).absolute() / CHECKPOINTS
  steps = finished_steps(workdir)
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

  def unreadable(error: BaseException) -> CorruptCheckpointError:
    logging.debug('Reading %s failed:', path, exc_info=error)
    others = [s for s in steps if s != step]
    hint = f'pass --step with one of {others}' if others else 'no other step is saved'
    return CorruptCheckpointError(
      f'Checkpoint step {step} at {path} cannot be read, its files are damaged or '
      f'incomplete ({_reason(error)}); {hint}.'
    )

  try:
    try:
      meta = handler.metadata(path)
      saved = getattr(meta, 'tree', meta)['params']
    except Exception as e:  # orbax / TensorStore raise many types.
      raise unreadable(e) from None
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
    try:
      restored = handler.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item={'params': abstract}, restore_args={'params': restore_args}, partial_restore=True
        ),
      )
    except Exception as e:
      raise unreadable(e) from None
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


def _reason(error: BaseException) -> str:
  """A one-line account of an error: the innermost cause, first line, at most 300 characters.

  TensorStore errors carry a full JSON spec after the first line.
  """
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  inner = seen[-1]
  line = (str(inner).strip().splitlines() or [''])[0]
  line = line.split(' See full TensorStore details')[0]
  line = f'{type(inner).__name__}: {line}'
  return line if len(line) <= 300 else line[:297] + '...'


def _is_disk_full(error: BaseException) -> bool:
  """Whether ENOSPC is anywhere in `error`'s chain (TensorStore only says it in words)."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _num_workers(state: dict) -> int | None:
  """The grain worker count a data-iterator state was saved with, when recognisable.

  An `mp_prefetch` pipeline saves one 'exhausted' flag per worker; an in-process one saves
  its parent's position ('next_index').
  """
  if isinstance(state.get('exhausted'), list):
    return len(state['exhausted'])
  if 'next_index' in state:
    return 0
  return None


def _iterator_workers(data_iter: Any) -> int | None:
  """The worker count of a grain `mp_prefetch` iterator: an interleave over its workers."""
  cycle = getattr(data_iter, '_cycle_length', None)
  return cycle if isinstance(cycle, int) else None


def _iterator_state(data_iter: Any) -> Any:
  """The iterator's state, except for worker pipelines, where asking starts the workers."""
  if _iterator_workers(data_iter) is not None:
    return None
  return data_iter.get_state()


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
    out[jax.tree_util.keystr(path, simple=True, separator='/')] = tuple(np.shape(leaf))
  return out
