"""Tests for triplane3d/checkpoint.py: save/restore of sharded state plus the data iterator,
atomicity, clear mismatch errors, and saving on preemption (SIGTERM, `preemption.py`) in one
and in two real processes.

The multi-process tests run `_loop_worker` below in fresh processes (see multiprocess.py): a
fake training loop whose state update and data are simple enough to replay in numpy, so
"resume equals uninterrupted" is checked exactly.
"""

import errno
import os
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections as mlc
import multiprocess as mp
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from triplane3d import checkpoint, preemption, sharding

LOCAL_BATCH = 4  # × 2 processes: a global batch of 8, one row per device.
W_SHAPE = (8, 4)


def _dataset(process_index: int):
  # Process p reads 1000·p + i: each host's share of the data is recognisable.
  return grain.MapDataset.range(1000).map(lambda i: 1000 * process_index + i)


def _data_iter(process_index: int = 0):
  return iter(_dataset(process_index).batch(LOCAL_BATCH).to_iter_dataset())


def _batch(p: int, t: int) -> list[int]:
  """Process p's local batch at step t (0-based)."""
  return [1000 * p + LOCAL_BATCH * t + i for i in range(LOCAL_BATCH)]


def _expected_w(num_steps: int, num_processes: int) -> np.ndarray:
  """The loop below replayed in numpy: w ← 0.5·w + sum(global batch), from w0."""
  w = np.arange(np.prod(W_SHAPE), dtype=np.float32).reshape(W_SHAPE)
  for t in range(num_steps):
    local = np.arange(LOCAL_BATCH * t, LOCAL_BATCH * (t + 1))
    total = sum(int((1000 * p + local).sum()) for p in range(num_processes))
    w = np.float32(0.5) * w + np.float32(total)
  return w


def _mesh():
  return sharding.make_mesh(mlc.ConfigDict({'data': -1, 'fsdp': 2}))


def _init_state(mesh):
  w_sh = NamedSharding(mesh, P('data', 'fsdp'))
  w0 = np.arange(np.prod(W_SHAPE), dtype=np.float32).reshape(W_SHAPE)
  w = jax.make_array_from_callback(W_SHAPE, w_sh, lambda idx: w0[idx])
  return {'step': jax.device_put(jnp.int32(0), sharding.replicated(mesh)), 'w': w}


def _state_shardings(mesh):
  return {'step': sharding.replicated(mesh), 'w': NamedSharding(mesh, P('data', 'fsdp'))}


def _loop_worker():
  """argv: workdir num_steps signal_at ready_file; signal_at = 'PID:STEP' or 'none'.

  Runs up to num_steps steps with a Checkpointer and a PreemptionGuard, resuming from the
  workdir if a checkpoint exists. Emits {'start', 'stop', 'batches', 'w_full'}.
  """
  workdir, num_steps, signal_at, ready_file = sys.argv[1:5]
  num_steps = int(num_steps)
  pid = jax.process_index()
  mesh = _mesh()
  shs = _state_shardings(mesh)
  bsh = sharding.batch_sharding(mesh)

  @jax.jit
  def train_step(state, batch):
    return {'step': state['step'] + 1, 'w': 0.5 * state['w'] + jnp.sum(batch)}

  step_fn = jax.jit(train_step, in_shardings=(shs, bsh), out_shardings=shs, donate_argnums=0)
  it = _data_iter(pid)
  batches = []
  with (
    checkpoint.Checkpointer(workdir, keep=2, save_every=4) as ckpt,
    preemption.PreemptionGuard() as guard,
  ):
    abstract = {
      'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=shs['step']),
      'w': jax.ShapeDtypeStruct(W_SHAPE, jnp.float32, sharding=shs['w']),
    }
    restored = ckpt.restore_latest(abstract, it)
    step, state = restored if restored else (0, _init_state(mesh))
    start = step
    while step < num_steps:
      local = next(it)
      batches.append(local.tolist())
      # Each host feeds its share; the global batch is split over every device of the mesh.
      batch = jax.make_array_from_process_local_data(bsh, local.astype(np.float32))
      state = step_fn(state, batch)
      step += 1
      if signal_at == f'{pid}:{step}':
        os.kill(os.getpid(), signal.SIGTERM)
      if ready_file != 'none' and step == 2:
        Path(ready_file).write_text('ready')
      if ready_file != 'none':
        time.sleep(0.05)  # Slow enough for the test to signal us mid-loop.
      if guard.should_stop(step):
        ckpt.save(step, state, it, force=True)
        break
      ckpt.save(step, state, it)
    else:
      ckpt.save(step, state, it, force=True)
  w_full = multihost_utils.process_allgather(state['w'], tiled=True)
  assert int(state['step']) == step
  mp.emit(
    {
      'start': start,
      'stop': step,
      'batches': batches,
      'w_full': np.asarray(w_full).tolist(),
      'steps': ckpt.all_steps(),
    }
  )


def test_roundtrip_sharded_state_and_data(devices, tmp_path):
  mesh = _mesh()
  shs = _state_shardings(mesh)
  it = _data_iter()
  for _ in range(3):
    next(it)
  state = {'step': jnp.int32(3), 'w': jax.device_put(jnp.ones(W_SHAPE) * 7, shs['w'])}
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every=2) as ckpt:
    assert ckpt.restore_latest(jax.eval_shape(lambda: state)) is None
    assert not ckpt.save(3, state, it)  # Not a multiple of save_every.
    assert ckpt.save(3, state, it, force=True)
    assert not ckpt.save(3, state, it, force=True)  # Already saved: a no-op, not an error.
    assert next(it).tolist() == _batch(0, 3)
    assert ckpt.save(4, state, it) and ckpt.save(6, state, it)
    # Read right away, while the save may still be writing: the iterator position was
    # captured inside save(), so the checkpoint says "next is batch 4".
    assert next(it).tolist() == _batch(0, 4)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]  # keep=2

  it2 = _data_iter()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    step, restored = ckpt.restore_latest(sharding.abstract_with_shardings(state, shs), it2)
  assert step == 6
  assert restored['w'].sharding.is_equivalent_to(shs['w'], 2)
  np.testing.assert_array_equal(restored['w'], np.full(W_SHAPE, 7.0))
  assert next(it2).tolist() == _batch(0, 4)


def test_half_written_checkpoint_is_never_latest(devices, tmp_path):
  state = {'w': jnp.arange(4.0), 'rng': jax.random.key(3)}  # Typed keys round-trip too.
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(5, state)
  # What a crash mid-save leaves: orbax writes here and renames only when complete.
  junk = tmp_path / 'checkpoints' / '9.orbax-checkpoint-tmp-1700000000'
  (junk / 'state').mkdir(parents=True)
  (junk / 'state' / 'garbage').write_text('half written')
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step == 5
    step, restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
  assert step == 5
  np.testing.assert_array_equal(restored['w'], np.arange(4.0))
  np.testing.assert_array_equal(
    jax.random.key_data(restored['rng']), jax.random.key_data(state['rng'])
  )


def test_mismatched_tree_is_a_clear_error(devices, tmp_path):
  state = {'params': {'a': jnp.zeros((2, 3)), 'b': jnp.zeros(4)}, 'step': jnp.int32(1)}
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(1, state)
  wrong = {
    'params': {
      'a': jax.ShapeDtypeStruct((2, 5), jnp.float32),
      'c': jax.ShapeDtypeStruct((1,), jnp.float32),
    },
    'step': jax.ShapeDtypeStruct((), jnp.int32),
  }
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError) as e:
      ckpt.restore_latest(wrong)
    msg = str(e.value)
    assert 'missing from the checkpoint: params/c (expected shape (1,))' in msg
    assert 'only in the checkpoint: params/b (shape (4,))' in msg
    assert 'shape mismatch: params/a: expected (2, 5), found (2, 3)' in msg
    assert 'fresh --workdir' in msg
    with pytest.raises(ValueError, match='no data-iterator state'):
      ckpt.restore_latest(jax.eval_shape(lambda: state), _data_iter())


def test_two_processes_agree_on_preemption_and_resume(tmp_path):
  """8 devices over 2 processes: process 1 alone is signalled at step 3; both save step 3
  and exit 0; a restart on both restores the sharded state and the data positions, and
  finishes exactly as an uninterrupted run would."""
  me = f'{__file__}:_loop_worker'
  first = mp.run_processes(me, args=(tmp_path, 10, '1:3', 'none'), timeout=60)
  assert [r[0]['stop'] for r in first] == [3, 3]
  assert [r[0]['steps'] for r in first] == [[3], [3]]
  assert first[1][0]['batches'] == [_batch(1, t) for t in range(3)]
  np.testing.assert_array_equal(first[0][0]['w_full'], _expected_w(3, 2))

  second = mp.run_processes(me, args=(tmp_path, 5, 'none', 'none'), timeout=60)
  for p, (r,) in enumerate(second):
    assert r['start'] == 3 and r['stop'] == 5
    assert r['batches'] == [_batch(p, 3), _batch(p, 4)]
    np.testing.assert_array_equal(r['w_full'], _expected_w(5, 2))
  assert second[0][0]['steps'] == [4, 5]  # save_every=4, keep=2


def test_sigterm_from_outside_saves_and_resumes(tmp_path):
  """A real SIGTERM sent to a running loop: it checkpoints, exits 0, and the next run resumes
  from that step with the next batch."""
  ready = tmp_path / 'ready'
  me = f'{__file__}:_loop_worker'
  job = mp.launch(me, num_processes=1, args=(tmp_path, 2000, 'none', ready), timeout=60)
  deadline = time.monotonic() + 100
  while not ready.exists():
    assert time.monotonic() < deadline and job.procs[0].poll() is None, job._failure('no start')
    time.sleep(0.05)
  job.procs[0].send_signal(signal.SIGTERM)
  ((r,),) = job.wait()
  stop = r['stop']
  assert 2 <= stop < 2000 and r['steps'][-1] == stop
  np.testing.assert_array_equal(r['w_full'], _expected_w(stop, 1))

  ((r2,),) = mp.run_processes(me, num_processes=1, args=(tmp_path, stop + 2, 'none', 'none'))
  assert r2['start'] == stop
  assert r2['batches'] == [_batch(0, stop), _batch(0, stop + 1)]
  np.testing.assert_array_equal(r2['w_full'], _expected_w(stop + 2, 1))
  assert r2['steps'][-1] == stop + 2


def _save_steps(tmp_path, steps, data_iter=None) -> dict:
  """Checkpoints of {'params': {'w'}, 'step'}, w = _w(step); returns the last state."""
  with checkpoint.Checkpointer(tmp_path, save_every=1) as ckpt:
    for s in steps:
      state = {'params': {'w': jnp.asarray(_w(s))}, 'step': jnp.int32(s)}
      ckpt.save(s, state, data_iter)
  return state


def _w(step: int) -> np.ndarray:
  # Random values: constant arrays compress to a few bytes, leaving nothing to truncate.
  return np.random.default_rng(step).normal(size=(64, 64)).astype(np.float32)


def _truncate_largest_array_file(step_dir: Path) -> Path:
  """Damages a step as a full disk or a killed copy would: its biggest array file cut short."""
  files = [p for p in (step_dir / 'state').glob('ocdbt.process_*/d/*') if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  assert victim.stat().st_size > 1000
  os.truncate(victim, 100)
  return victim


def test_corrupt_latest_checkpoint_falls_back_and_is_set_aside(devices, tmp_path, caplog):
  state = _save_steps(tmp_path, [2, 4])
  root = tmp_path / 'checkpoints'
  _truncate_largest_array_file(root / '4')
  abstract = jax.eval_shape(lambda: state)
  with checkpoint.Checkpointer(tmp_path, keep=2, save_every=1) as ckpt:
    step, restored = ckpt.restore_latest(abstract)  # Was a raw TensorStore OUT_OF_RANGE.
    assert step == 2
    np.testing.assert_array_equal(restored['params']['w'], _w(2))
    assert ckpt.all_steps() == [2]
    # The bad step is kept for inspection, outside orbax's directory, with its error.
    (kept,) = [p for p in (tmp_path / 'checkpoints_corrupt').iterdir() if p.is_dir()]
    assert kept.name.startswith('4.') and (kept / 'state').is_dir()
    assert 'step 4 failed to restore' in kept.with_name(kept.name + '.txt').read_text()
    # Training goes on: step 4 is saved afresh, and pruning (keep=2) never reaches the
    # set-aside copy.
    for s in (4, 6, 8):
      assert ckpt.save(s, restored)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 8]
  assert kept.is_dir()
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert any('STEP 4 IS UNREADABLE' in w and 'OUT_OF_RANGE' in w for w in warnings), warnings


def test_no_restorable_checkpoint_names_every_step_and_moves_nothing(devices, tmp_path):
  state = _save_steps(tmp_path, [2, 4])
  root = tmp_path / 'checkpoints'
  for s in ('2', '4'):
    _truncate_largest_array_file(root / s)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r'tried steps \[4, 2\]'):
      ckpt.restore_latest(jax.eval_shape(lambda: state))
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ['2', '4']
  assert not (tmp_path / 'checkpoints_corrupt').exists()


def test_restore_params_names_a_corrupt_step(devices, tmp_path):
  _save_steps(tmp_path, [2, 4])
  _truncate_largest_array_file(tmp_path / 'checkpoints' / '4')
  with pytest.raises(checkpoint.CorruptCheckpointError) as e:
    checkpoint.restore_params(tmp_path)  # Was a bare Exception with a TensorStore spec dump.
  msg = str(e.value)
  assert 'step 4' in msg and 'damaged' in msg and 'pass --step with one of [2]' in msg
  assert len(msg) < 1000
  _, params = checkpoint.restore_params(tmp_path, 2)
  np.testing.assert_array_equal(params['w'], _w(2))


def test_another_worker_count_is_a_named_error(devices, tmp_path):
  it = _data_iter()
  next(it)
  state = _save_steps(tmp_path, [1], it)
  with_workers = iter(
    _dataset(0).batch(LOCAL_BATCH).to_iter_dataset().mp_prefetch(
      grain.MultiprocessingOptions(num_workers=2)
    )
  )  # fmt: skip
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    # Was `KeyError: 'exhausted'` from inside grain.
    with pytest.raises(
      checkpoint.DataStateMismatchError,
      match=r'data.num_workers=0; this run has data.num_workers=2.*--config.data.num_workers=0',
    ):
      ckpt.restore_latest(jax.eval_shape(lambda: state), with_workers)
    assert ckpt.all_steps() == [1]  # Not mistaken for a corrupt checkpoint.


@pytest.mark.parametrize('where', ['save', 'wait'])
def test_disk_full_is_one_clear_error(devices, tmp_path, monkeypatch, where):
  state = {'w': jnp.zeros(4)}
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1)
  assert ckpt.save(1, state)
  ckpt.wait()
  full = OSError(errno.ENOSPC, 'No space left on device')

  def fail(*args, **kwargs):
    if where == 'save':
      raise full
    # An asynchronous save reports it later, wrapped.
    raise RuntimeError('background save failed') from full

  method = 'save' if where == 'save' else 'wait_until_finished'
  monkeypatch.setattr(ckpt._manager, method, fail)
  with pytest.raises(checkpoint.DiskFullError) as e:
    ckpt.save(2, state)
    ckpt.wait()
  msg = str(e.value)
  assert e.value.errno == errno.ENOSPC and '\n' not in msg
  assert 'Disk full' in msg and 'step 2' in msg and str(tmp_path / 'checkpoints') in msg
  assert 'MiB free' in msg and 'last finished checkpoint is step 1' in msg
  assert e.value.__cause__ is None and e.value.__suppress_context__  # No 600-line chain.
  monkeypatch.undo()
  ckpt.close()
