"""Gradient accumulation (`train.accum_steps`): k micro-batches of B/k images give the step of
one batch of B, and impossible splits are refused by name.

Tolerances. The losses are means over images, so the mean of the micro-batches' gradients is
the whole batch's gradient in real arithmetic; in float32 only the order of the additions
differs (k partial means summed and divided by k, instead of one sum over B images), so an
element differs by a few ulps of the largest terms summed into it. Measured on these tiny
configs: at most 2.2e-7 on gradients up to 0.23 (about 15 ulps of 0.23); the tests allow
1e-6 absolute (4e-6 of the largest gradient) plus 1e-5 relative. Metrics are means of a few
thousand float32 values: measured relative differences at most 1.3e-5 (the small 'dist'
term), allowed 5e-5.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import tiny_config

from triplane3d import sharding, train
from triplane3d.data import pipeline

# An "optimiser" whose state becomes the step's gradient (parameters unchanged): the gradient
# itself, not params - new params, whose float32 subtraction would round it to ulps of params.
RECORD = optax.GradientTransformation(
  init=lambda params: jax.tree.map(jnp.zeros_like, params),
  update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
)
DATA = {'mesh.data': 2}  # Batch 8 over 2 devices: micro-batches of 4 and 2 split evenly.
FSDP = {'mesh.data': 1, 'mesh.fsdp': 2}  # Params and the gradient sum split over fsdp.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic'))


def _config(data_dir, accum_steps, overrides):
  # The conv decoder with every ray rendered draws nothing at random (the triplane renderer's
  # draws are checked below).
  over = {'decoder.kind': 'conv', 'train.accum_steps': accum_steps, **overrides}
  return tiny_config(data_dir, **over)


def _inputs(config, tx=None):
  """(setup, state, teacher, batch, k_train) of a tiny run on data × fsdp devices."""
  devices = jax.devices()[: config.mesh.data * config.mesh.fsdp]
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = train.build(config, mesh, config.train.num_steps)
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  state = jax.jit(setup.init_state, out_shardings=setup.state_shardings)(k_init)
  # A teacher away from the student, so that distillation has a gradient too.
  teacher = jax.tree.map(lambda x: x + 0.01, state['params']['backbone'])
  if tx is not None:
    setup = dataclasses.replace(setup, tx=tx)
    state = dict(state, opt_state=tx.init(state['params']))
  batch = sharding.to_global(next(pipeline.create(config, pipeline.prepare(config))), mesh)
  return setup, state, teacher, batch, k_train


_GRADS = {}


def _grads_and_metrics(data_dir, accum_steps, overrides):
  """The step's gradient (host arrays) and metrics (floats), cached per setting."""
  cache_key = (accum_steps, tuple(sorted(overrides.items())))
  if cache_key not in _GRADS:
    config = _config(data_dir, accum_steps, overrides)
    setup, state, teacher, batch, k_train = _inputs(config, RECORD)
    state, metrics = jax.jit(train.make_train_step(setup, config, k_train))(state, teacher, batch)
    _GRADS[cache_key] = (
      jax.tree.map(np.asarray, state['opt_state']),
      {name: float(v) for name, v in metrics.items()},
    )
  return _GRADS[cache_key]


def _assert_metrics_equal(got, want):
  assert sorted(got) == sorted(want)  # The same names are logged.
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=5e-5, err_msg=name)


@pytest.mark.parametrize('overrides', [DATA, FSDP], ids=['data', 'fsdp'])
@pytest.mark.parametrize('accum_steps', [2, 4])
def test_accumulated_gradient_equals_one_big_batch(data_dir, accum_steps, overrides):
  grads1, metrics1 = _grads_and_metrics(data_dir, 1, overrides)
  grads, metrics = _grads_and_metrics(data_dir, accum_steps, overrides)
  assert metrics1['dist'] > 0 and metrics1['grad_norm'] > 0  # Every term pulls.
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads1), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  _assert_metrics_equal(metrics, metrics1)


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_the_step_converts_uint8_pixels_itself(data_dir, accum_steps):
  """The trainer feeds uint8 pixels (`train.device_batches`); the step converts them, per
  micro-batch, to what the float pipeline gives: the same gradient and metrics. The same
  pixels merely cast to float32 (0–255 inputs and targets) give another gradient."""
  config = _config(data_dir, accum_steps, DATA)
  setup, state, teacher, batch, k_train = _inputs(config, RECORD)
  mesh = setup.mesh
  data = pipeline.prepare(config)
  raw = sharding.to_global(next(pipeline.create(config, data, float_pixels=False)), mesh)
  assert raw['image'].dtype == raw['rgb'].dtype == jnp.uint8
  step = jax.jit(train.make_train_step(setup, config, k_train))
  results = []
  cast = {**raw, 'image': raw['image'].astype(jnp.float32), 'rgb': raw['rgb'].astype(jnp.float32)}
  for b in (batch, raw, cast):
    new_state, metrics = step(state, teacher, b)
    results.append((jax.tree.leaves(new_state['opt_state']), metrics))
  (want, want_m), (got, got_m), (wrong, _) = results
  for a, b in zip(got, want, strict=True):
    # The inputs differ by float32 roundings (≤ 1e-6): tolerances as for accumulation above.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  _assert_metrics_equal(
    {k: float(v) for k, v in got_m.items()}, {k: float(v) for k, v in want_m.items()}
  )
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(wrong, want)) > 1e-3


def test_accumulated_adam_step_equals_one_big_batch(data_dir):
  """The trainer's own jitted, sharded, donating step with Adam: the same new parameters."""
  over = {**FSDP, 'optim.lr': 1e-4}
  results = []
  for accum_steps in (1, 4):
    config = _config(data_dir, accum_steps, over)
    setup, state, teacher, batch, k_train = _inputs(config)
    step = train.jit_train_step(setup, config, k_train)
    for _ in range(2):
      state, metrics = step(state, teacher, batch)
    results.append((state, {name: float(v) for name, v in metrics.items()}))
  (state1, metrics1), (state4, metrics4) = results
  # Adam's first steps are ±lr per parameter whatever the gradient's size, so where a
  # gradient component is at float32's noise level (summed in another order when split) its
  # update is noise too, up to lr per step (seen: 1 of 37,632 patch-embedding weights moved
  # 0.73·lr apart). The gradients themselves are compared exactly above; here every
  # parameter must agree to lr·1e-1, apart from at most 1 in 10,000 per leaf, which must stay
  # within the two steps' 2·lr. A wrong scale or a missing micro-batch moves far more.
  lr = over['optim.lr']
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(state4['params']),
    jax.tree.leaves(state1['params']),
    strict=True,
  ):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    assert diff.max() <= 2 * lr, (path, diff.max())
    assert np.sum(diff > 0.1 * lr) <= max(1, diff.size // 10_000), (path, np.sum(diff > 0.1 * lr))
  _assert_metrics_equal(metrics4, metrics1)


def test_accumulated_triplane_gradient_equals_one_big_batch(data_dir):
  grads = []
  for accum_steps in (1, 2):
    # A random subset of rays per image: each image must draw the same ones in either split.
    over = {'train.accum_steps': accum_steps, 'render.rays_per_image': 20, **DATA}
    config = tiny_config(data_dir, **over)
    setup, state, teacher, batch, k_train = _inputs(config, RECORD)
    state, _ = jax.jit(train.make_train_step(setup, config, k_train))(state, teacher, batch)
    grads.append(jax.tree.map(np.asarray, state['opt_state']))
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'accum_steps, message',
  [
    # Micro-batches of 4 cannot be split over 8 devices.
    (2, r'train.batch_size=8 with train.accum_steps=2 gives micro-batches of 4 images.*'
     r'mesh data × fsdp = 8 × 1 = 8 devices: use a train.accum_steps in \[1\]'),
    (3, r'train.batch_size=8 with train.accum_steps=3 gives micro-batches of 2.66667'),
    (0, r'train.accum_steps must be a positive number'),
  ],
)  # fmt: skip
def test_indivisible_batches_are_refused(data_dir, tmp_path, accum_steps, message):
  config = tiny_config(data_dir, **{'train.accum_steps': accum_steps})  # 8 devices.
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path / 'w'))
