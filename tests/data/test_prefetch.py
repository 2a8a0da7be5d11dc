"""Device prefetch: the same batches as the plain pipeline, placed on the devices, and a
checkpointed position that is the consumer's, not the prefetcher's (so resume stays exact)."""

import threading
import time

import datasets_for_tests as dft
import grain
import jax
import numpy as np
import pytest
from absl import flags

from triplane3d import checkpoint, sharding
from triplane3d.data import pipeline
from triplane3d.data.prefetch import DevicePrefetch

EPOCH = 4  # Batches per epoch: 32 examples, batches of 8.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('posimg')
  dft.write(d, n=32)
  return d


class _Put:
  """`sharding.to_global` on the 8 test devices, counting the batches placed."""

  def __init__(self):
    self.mesh = sharding.make_mesh(dft.config('').mesh)
    self.count = 0
    self._lock = threading.Lock()

  def __call__(self, batch):
    with self._lock:
      self.count += 1
    return sharding.to_global(batch, self.mesh)

  def wait_for(self, count: int) -> None:
    """Until `count` batches were placed: the producer is then `count - consumed` ahead."""
    deadline = time.monotonic() + 60
    while self.count < count:
      assert time.monotonic() < deadline, f'{self.count} batches placed, expected {count}'
      time.sleep(0.01)


def _create(data_dir, workers=0):
  c = dft.config(data_dir, workers=workers)
  return pipeline.create(c, pipeline.prepare(c), block=0, process_count=1)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(want, got):
  assert len(want) == len(got)
  for w, g in zip(want, got, strict=True):
    assert set(w) == set(g)
    for k in w:
      np.testing.assert_array_equal(np.asarray(w[k]), np.asarray(g[k]), err_msg=k)


def test_same_batches_in_the_same_order_on_the_devices(data_dir, devices):
  put = _Put()
  plain = [put(b) for b in _take(_create(data_dir), EPOCH + 2)]  # Across an epoch boundary.
  it = DevicePrefetch(_create(data_dir), put, 2)
  got = _take(it, EPOCH + 2)
  it.close()
  _assert_same(plain, got)
  for leaf in jax.tree.leaves(got[0]):
    assert isinstance(leaf, jax.Array) and leaf.sharding == sharding.batch_sharding(put.mesh)


@pytest.mark.parametrize('workers', [0, 2])
def test_saved_state_is_the_consumers_and_restores_exactly(data_dir, devices, workers):
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read flags.
  put = _Put()
  plain = _create(data_dir, workers)
  it = DevicePrefetch(_create(data_dir, workers), put, 2)
  for consumed, more in ((1, 1), (3, 2)):  # Mid-epoch, then one batch before its end.
    _take(it, more), _take(plain, more)
    put.wait_for(consumed + 2)  # Two batches ahead: the wrapped iterator's own state is past.
    assert it._it.get_state() != plain.get_state()
    state = it.get_state()
    assert state == plain.get_state()
  want = [put(b) for b in _take(plain, 3)]
  # Restored into a fresh wrapper, and into the running one (its queue is dropped).
  fresh = DevicePrefetch(_create(data_dir, workers), put, 2)
  fresh.set_state(state)
  _assert_same(want, _take(fresh, 3))
  it.set_state(state)
  _assert_same(want, _take(it, 3))
  for i in (plain, fresh, it):
    i.close()  # Stop the threads and worker processes now, not at interpreter exit.


def test_checkpointer_saves_and_restores_the_consumers_position(data_dir, devices, tmp_path):
  put = _Put()
  it = DevicePrefetch(_create(data_dir), put, 2)
  _take(it, 3)
  state = {'step': jax.numpy.int32(3)}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(3, state, it, force=True)
  want = _take(it, 3)
  it.close()
  fresh = DevicePrefetch(_create(data_dir), put, 2)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    step, _ = ckpt.restore_latest(jax.eval_shape(lambda: state), fresh)
  assert step == 3
  _assert_same(want, _take(fresh, 3))
  fresh.close()


def test_off_is_the_plain_iterator(data_dir, devices):
  put = _Put()
  plain = _create(data_dir)
  it = DevicePrefetch(_create(data_dir), put, 0)
  for _ in range(3):
    _assert_same([put(next(plain))], [next(it)])
    # Nothing is drawn ahead: the wrapped iterator is where the consumer is.
    assert it.get_state() == it._it.get_state() == plain.get_state()
  assert it._thread is None
  it.close()


class _Failing(grain.DatasetIterator):
  """Two batches, then an OSError (a disk that went away)."""

  def __init__(self):
    super().__init__()
    self.drawn = 0

  def __next__(self):
    self.drawn += 1
    if self.drawn > 2:
      raise OSError('disk gone')
    return {'x': np.full(2, self.drawn)}

  def get_state(self):
    return {'drawn': self.drawn}

  def set_state(self, state):
    self.drawn = state['drawn']


def test_an_error_reaches_the_consumer_after_the_good_batches():
  it = DevicePrefetch(_Failing(), lambda b: b, 3)
  assert [int(next(it)['x'][0]) for _ in range(2)] == [1, 2]
  with pytest.raises(OSError, match='disk gone'):
    next(it)
  assert it.get_state() == {'drawn': 3}
  it.close()


def test_a_negative_size_is_refused(data_dir):
  with pytest.raises(ValueError, match=r'data.device_prefetch must be .* >= 0.*got -1'):
    DevicePrefetch(_create(data_dir), lambda b: b, -1)


def test_the_trainers_batches_are_uint8_on_the_devices_and_the_step_sees_floats(data_dir, devices):
  """`train.device_batches` places uint8 pixels; `train.float_batch` (what the step applies)
  turns them into the float pipeline's batches placed directly, within a few float32 roundings."""
  from triplane3d import train

  c = dft.config(data_dir)
  c.data.device_prefetch = 2
  data = pipeline.prepare(c)
  put = _Put()
  want = [put(b) for b in _take(pipeline.create(c, data, block=0, process_count=1), 3)]
  it = train.device_batches(c, data, put.mesh, 0)
  try:
    got = _take(it, 3)
  finally:
    it.close()
  to_float = jax.jit(train.float_batch)
  for w, g in zip(want, got, strict=True):
    assert g['image'].dtype == g['rgb'].dtype == np.uint8
    assert g['image'].sharding.is_equivalent_to(w['image'].sharding, 4)
    f = to_float(g)
    assert set(f) == set(w)
    for k in w:
      assert f[k].dtype == w[k].dtype, k
      # A few float32 roundings: XLA multiplies by the reciprocals of 255 and of the std.
      atol = 1e-6 if k in ('image', 'rgb') else 0
      np.testing.assert_allclose(np.asarray(f[k]), np.asarray(w[k]), rtol=0, atol=atol, err_msg=k)
  assert train.float_batch(want[0]) is want[0]  # A float batch passes as it is.
