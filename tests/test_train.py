"""The trainer on tiny configs: frozen teacher, sharded = single-device, resume = uninterrupted,
NaN stop, refusals of impossible configs."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import tiny_config
from xla_env import subprocess_env

from triplane3d import checkpoint, convert, run_config, sharding, train
from triplane3d.data import pipeline


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic'))


def _setup(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = train.build(config, mesh, config.train.num_steps)
  assert setup.use_teacher
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  state, teacher = train.initial_state(setup, config, k_init)  # The trainer's own fresh start.
  step = train.jit_train_step(setup, config, k_train)
  batch = sharding.to_global(next(pipeline.create(config, pipeline.prepare(config))), mesh)
  return mesh, state, teacher, step, batch


def test_teacher_gets_no_gradient_and_never_changes(data_dir):
  config = tiny_config(data_dir, **{'mesh.data': 1})
  _, state, teacher, step, batch = _setup(config, jax.devices()[:1])
  before = jax.tree.map(np.asarray, teacher)
  scratch = jax.tree.map(jnp.copy, state)  # The step donates its state argument.
  grads = jax.grad(lambda t: step(scratch, t, batch)[1]['total'])(teacher)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
  for _ in range(2):
    state, metrics = step(state, teacher, batch)
  assert float(metrics['dist']) > 0  # The student moved away from the teacher...
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(teacher), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))  # ...which did not move.


@pytest.mark.parametrize('fsdp', [1, 2])
def test_fresh_teacher_is_a_copy_equal_to_what_a_resume_recreates(data_dir, devices, fsdp):
  """A new run copies the student's initial backbone into the teacher; a resumed run, which has
  no initial state, initialises it from the key: the same values, bit for bit, and the copy
  survives the state's donation (returning the student's own arrays fails here), replicated
  (fsdp 1) and split (fsdp 2)."""
  config = tiny_config(data_dir, **{'mesh.data': 8 // fsdp, 'mesh.fsdp': fsdp})
  setup = train.build(config, sharding.make_mesh(config.mesh), 4)
  key = jax.random.split(jax.random.key(config.seed))[0]
  state, teacher = train.initial_state(setup, config, key)
  recreated = train.teacher_params(setup, key)
  assert jax.tree.structure(teacher) == jax.tree.structure(state['params']['backbone'])
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(recreated), strict=True):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(lambda x: x.delete(), state)  # What donating the state to the step does.
  assert not any(x.is_deleted() for x in jax.tree.leaves(teacher))
  assert np.isfinite(np.asarray(jax.tree.leaves(teacher)[0])).all()


def test_sharded_step_equals_single_device(data_dir, devices):
  # The paper's lr: Adam's first steps are ±lr for every parameter, so reduction-order noise
  # in near-zero gradients moves a parameter by up to ~lr·1e-2; at 1e-4 that is within 1e-5.
  over = {'optim.lr': 1e-4}
  config = tiny_config(data_dir, **{'mesh.data': 4, 'mesh.fsdp': 2, **over})
  _, s8, t8, step8, b8 = _setup(config, devices)
  config1 = tiny_config(data_dir, **{'mesh.data': 1, **over})
  _, s1, t1, step1, b1 = _setup(config1, devices[:1])
  np.testing.assert_array_equal(np.asarray(b8['image']), np.asarray(b1['image']))
  for _ in range(2):
    s8, m8 = step8(s8, t8, b8)
    s1, m1 = step1(s1, t1, b1)
  for k in ('total', 'rgb', 'depth', 'dist', 'grad_norm'):
    np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(s8['params']), jax.tree.leaves(s1['params']), strict=True
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=str(path))
  # Intended shardings after a step: big weights split over fsdp, Adam moments alike.
  qkv = s8['params']['backbone']['blocks_0']['attn']['qkv']['kernel']
  assert qkv.sharding.spec == P('fsdp'), qkv.sharding.spec
  assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape[0] == 32
  mu = [
    leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(s8['opt_state'])
    if 'mu' in jax.tree_util.keystr(path) and 'blocks_0' in jax.tree_util.keystr(path)
    and 'qkv' in jax.tree_util.keystr(path) and 'kernel' in jax.tree_util.keystr(path)
  ]  # fmt: skip
  assert mu and all(m.sharding.spec == P('fsdp') for m in mu)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  make = train.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def wrapped(state, teacher, batch):
      new, metrics = step_fn(state, teacher, batch)
      bad = state['step'] >= 2  # Steps 3 and later produce NaN.
      metrics = dict(metrics, total=jnp.where(bad, jnp.nan, metrics['total']))
      return new, metrics

    return wrapped

  monkeypatch.setattr(train, 'make_train_step', poisoned)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(
    train.NonFiniteLossError, match=r'non-finite loss at step 3.*last good checkpoint is step 2'
  ):
    train.run(tiny_config(data_dir, **{'train.num_steps': 6}), workdir)
  with checkpoint.Checkpointer(workdir) as ckpt:
    assert ckpt.all_steps() == [2]


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'train.batch_size': 6}, 'not divisible by mesh data × fsdp'),
    ({'mesh.data': 3}, 'mesh.data=3'),
    ({'optim.lr_mults': (('backbone/.*', 0.5),)}, 'match no rule of optim.lr_mults'),
    ({'decoder.kind': 'mlp'}, "decoder.kind must be 'triplane' or 'conv'"),
    # keep_ckpts=0 used to delete every checkpoint, the one just written included.
    ({'train.keep_ckpts': 0}, r'train.keep_ckpts must be >= 1'),
    ({'train.batch_size': 0}, r'train.batch_size must be a positive'),  # Was ZeroDivisionError.
    # A negative num_steps used to fall back to num_epochs silently.
    ({'train.num_steps': -1}, r'train.num_steps must be >= 0'),
    # Epoch mode with a batch larger than the dataset used to train 0 steps and exit 0.
    ({'train.num_steps': 0, 'train.batch_size': 64}, r'is 0 steps'),
    ({'train.image_every_steps': -1}, r'image_every_steps must be .* or 0 for no image grids'),
    ({'train.log_every_steps': 0}, r'train.log_every_steps must be a positive number'),
  ],
)
def test_impossible_configs_are_refused(data_dir, tmp_path, overrides, message):
  config = tiny_config(data_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path / 'w'))


def test_conv_decoder_ablation_trains(data_dir, tmp_path):
  config = tiny_config(
    data_dir, **{'decoder.kind': 'conv', 'loss.dist_weight': 0.0, 'train.num_steps': 2}
  )
  workdir = str(tmp_path / 'conv')
  result = train.run(config, workdir)
  assert result['step'] == 2 and all(np.isfinite(v) for v in result['losses'].values())
  # The trained backbone exports to official DINOv2 keys and loads back unchanged.
  out = str(tmp_path / 'backbone.pth')
  done = subprocess.run(
    [sys.executable, '-m', 'triplane3d.convert.export', f'--workdir={workdir}', f'--out={out}'],
    check=True,
    capture_output=True,
    text=True,
    env=subprocess_env(),
  )
  # The console says what was written, not orbax's chatter or runpy / torch warnings.
  assert f'wrote {out}' in done.stdout
  noise = done.stderr.strip().splitlines()
  assert len(noise) <= 1 and 'Warning' not in done.stderr, done.stderr
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()  # Not private (was 0600).
  # An existing file is not replaced without --overwrite.
  refused = subprocess.run(
    [sys.executable, '-m', 'triplane3d.convert.export', f'--workdir={workdir}', f'--out={out}'],
    capture_output=True,
    env=subprocess_env(),
  )
  assert refused.returncode != 0 and b'--overwrite' in refused.stderr
  again = convert.load_dinov2(out, 'vit_tiny14')
  want = result['state']['params']['backbone']
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize('slow', ['input', 'step'])
def test_waiting_for_data_is_measured_and_named(data_dir, tmp_path, monkeypatch, caplog, slow):
  """Batches placed 0.4 s late (the step takes milliseconds): the log windows report the loop
  waiting most of their time for data, and the run warns once, naming the fix. A step made 0.4 s
  slower instead, with the batches in time: the windows report little waiting, no warning."""
  if slow == 'input':  # The prefetch thread places each batch 0.4 s late.
    monkeypatch.setattr(sharding, 'to_global', _delayed(sharding.to_global))
  else:
    plain_jit = train.jit_train_step

    def slow_jit(*args):
      return _delayed(plain_jit(*args))

    monkeypatch.setattr(train, 'jit_train_step', slow_jit)
  # No grids, held-out renders or saves between the steps: the producer would catch up then.
  over = {
    'decoder.kind': 'conv', 'train.num_steps': 5, 'train.log_every_steps': 1,
    'train.image_every_steps': 0, 'eval.num_heldout': 0, 'train.ckpt_every_steps': 1000,
  }  # fmt: skip
  workdir = tmp_path / slow
  with caplog.at_level(logging.WARNING):
    train.run(tiny_config(data_dir, **over), str(workdir))
  lines = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert 'first_step_s' in lines[0] and 'data_wait' not in lines[0]  # The compiling step.
  waits = [x['data_wait'] for x in lines[1:]]
  warned = [r.getMessage() for r in caplog.records if 'is the bottleneck' in r.getMessage()]
  if slow == 'input':
    # Step 2's batch was placed while step 1 compiled; steps 3–5 each wait ~0.4 s.
    assert len(waits) == 4 and all(0.5 < w < 1 for w in waits[1:]), waits
    assert len(warned) == 1 and 'data.num_workers (now 0)' in warned[0], warned
  else:
    assert len(waits) == 4 and all(0 <= w < 0.2 for w in waits), waits
    assert not warned, warned


def _delayed(f, seconds=0.4):
  """`f`, returning `seconds` later."""

  def g(*args, **kwargs):
    out = f(*args, **kwargs)
    time.sleep(seconds)
    return out

  return g


def test_input_bound_windows_warn_others_do_not(caplog):
  from triplane3d.configs import common

  config = common.get_base_config()
  with caplog.at_level(logging.WARNING):
    assert train.warn_if_input_bound(7, 0.35, 0.2, config)
  assert 'step 7' in caplog.text and '20% and 35%' in caplog.text
  assert f'(now {config.data.num_workers})' in caplog.text
  assert 'device_prefetch' not in caplog.text
  caplog.clear()
  assert not train.warn_if_input_bound(7, 0.35, 0.05, config)  # One slow window: a hiccup.
  assert not train.warn_if_input_bound(7, 0.05, 0.35, config)
  assert not train.warn_if_input_bound(7, 0.35, None, config)  # The first window of a run.
  assert not train.warn_if_input_bound(7, None, 0.35, config)  # The compiling window.
  assert not caplog.text
  sync = config.copy_and_resolve_references()
  sync.data.device_prefetch = 0
  with caplog.at_level(logging.WARNING):
    assert train.warn_if_input_bound(7, 0.5, 0.5, sync)
  assert 'data.device_prefetch=0' in caplog.text


def test_init_from_dinov2_checkpoint_and_a_frozen_group(data_dir, tmp_path):
  """The student starts from the loaded weights and the teacher is those same weights; with
  the backbone's learning rate at 0 it stays at them, bit for bit, while the decoder moves.
  Without image grids (tiny.py), held-out scenes are still scored at the end."""
  from triplane3d.models import vit

  model = vit.create('vit_tiny14')
  weights = vit.init_params(model, jax.random.key(42), 28)
  path = str(tmp_path / 'dinov2_tiny.safetensors')
  convert.save_dinov2(weights, path)
  frozen = (('backbone/.*', 0.0), ('.*', 1.0))  # Keep the backbone at the loaded weights.
  over = {'train.num_steps': 1, 'optim.lr_mults': frozen, 'eval.num_heldout': 2}
  config = tiny_config(data_dir, **{'model.init_from': path, **over})
  workdir = tmp_path / 'init'
  result = train.run(config, str(workdir))
  for a, b in zip(
    jax.tree.leaves(weights), jax.tree.leaves(result['state']['params']['backbone']), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The decoder's initial values: the run's own init program, from the run's init key.
  setup = train.build(config, sharding.make_mesh(config.mesh), 1)
  k_init = jax.random.split(jax.random.key(config.seed))[0]
  start = train.fresh_state(setup, k_init)['params']['decoder']
  moved = [
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
      jax.tree.leaves(start), jax.tree.leaves(result['state']['params']['decoder']), strict=True
    )
  ]
  assert all(moved), moved  # Adam's first step moves every parameter with a gradient by ~lr.
  (line,) = (workdir / 'metrics.jsonl').read_text().splitlines()
  # Student == teacher: the same representations, up to rounding (the teacher's forward and the
  # student's, under the gradient, are separately compiled and fused programs; 5e-16 measured
  # with XLA:CPU's older fusion emitters, exactly 0 with the new ones). A teacher other than the
  # loaded weights gives ~1e-1 (the tiny runs' dist after a step).
  assert abs(json.loads(line)['dist']) < 1e-12
  assert json.loads(line)['heldout/psnr'] == result['heldout']['psnr'] > 0
  assert result['images'] == [] and not list(workdir.glob('images/*'))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# The finished run's mesh: restores go onto parameters and Adam moments split over fsdp.
FSDP = {'mesh.data': 4, 'mesh.fsdp': 2}


def _fsdp_config(data_dir, **overrides):
  return tiny_config(data_dir, **FSDP, **overrides)


@dataclasses.dataclass(frozen=True)
class Finished:
  workdir: Path
  losses: dict  # {step: total loss}
  params: list  # The final parameters' leaves, as numpy arrays.


@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
  """A finished 4-step tiny run on a 4 × 2 (data × fsdp) mesh, checkpoints 2 and 4; tests
  resume copies of it."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  result = train.run(_fsdp_config(data_dir), str(workdir))
  assert result['step'] == 4 and sorted(result['losses']) == [1, 2, 3, 4]
  # train.image_every_steps = 0 (tiny.py): no grids drawn.
  assert result['images'] == [] and not list(workdir.glob('images/*'))
  params = [np.asarray(x) for x in jax.tree.leaves(result['state']['params'])]
  return Finished(workdir, result['losses'], params)


def _copy(finished, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(finished.workdir, workdir)
  return workdir


@pytest.mark.slow
def test_resume_equals_uninterrupted(data_dir, finished, tmp_path):
  """A run that died after logging step 4 but before saving it resumes from step 2, onto
  sharded parameters and Adam state: steps 3 and 4 give the uninterrupted run's losses and
  final parameters bit for bit, and the log keeps one line per step (the resumed run's)."""
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '4')  # As if the run died before saving step 4.
  resumed = train.run(_fsdp_config(data_dir), str(workdir))
  assert resumed['step'] == 4 and sorted(resumed['losses']) == [3, 4]
  # Same data and same params: the resumed losses are bitwise the uninterrupted ones.
  assert [resumed['losses'][s] for s in (3, 4)] == [finished.losses[s] for s in (3, 4)]
  got = jax.tree.leaves(resumed['state']['params'])
  for a, b in zip(finished.params, got, strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  lines = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in lines] == [1, 2, 3, 4]
  assert [x['total'] for x in lines] == [finished.losses[s] for s in (1, 2, 3, 4)]
  # The first step of each process (1, and 3 after the resume) compiles: it is timed on its
  # own and never counted in images/s.
  assert [('first_step_s' in x, 'images_per_sec' in x) for x in lines] == [
    (True, False),
    (False, True),
    (True, False),
    (False, True),
  ]


def test_corrupt_latest_checkpoint_resumes_from_the_one_before(data_dir, finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  d = workdir / 'checkpoints' / '4' / 'state'
  victim = max((p for p in d.glob('ocdbt.process_*/d/*') if p.is_file()), key=os.path.getsize)
  os.truncate(victim, 100)  # Was a raw TensorStore OUT_OF_RANGE error, on every resume.
  result = train.run(_fsdp_config(data_dir), str(workdir))
  assert [result['losses'][s] for s in (3, 4)] == [finished.losses[s] for s in (3, 4)]
  assert checkpoint.finished_steps(workdir) == [2, 4]  # Step 4 saved afresh.
  (kept,) = (workdir / 'checkpoints_corrupt').glob('4.*[0-9]')
  assert (kept / 'state' / victim.relative_to(d)).stat().st_size == 100  # Kept as found.


def test_config_is_stored_and_a_resume_that_changes_the_run_is_refused(
  data_dir, finished, tmp_path
):
  workdir = _copy(finished, tmp_path)
  want = _fsdp_config(data_dir)
  want.workdir = str(finished.workdir)
  assert run_config.differences(run_config.read(str(workdir)), want) == []
  changed = _fsdp_config(data_dir, **{'optim.lr': 0.5, 'loss.rgb_weight': 2.0})
  with pytest.raises(run_config.ConfigChangedError) as e:
    train.run(changed, str(workdir))
  assert '  loss.rgb_weight: 1.0 -> 2.0\n  optim.lr: 0.001 -> 0.5\n' in str(e.value)
  # Longer, logged less often, in a moved workdir: the same run, continued.
  longer = _fsdp_config(data_dir, **{'train.num_steps': 6, 'train.log_every_steps': 2})
  result = train.run(longer, str(workdir))
  assert sorted(result['losses']) == [5, 6]
  assert run_config.read(str(workdir)).train.num_steps == 6


def test_resuming_with_another_worker_count_is_a_named_error(data_dir, finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  config = _fsdp_config(data_dir, **{'data.num_workers': 1})
  with pytest.raises(run_config.ConfigChangedError, match=r'data.num_workers: 0 -> 1'):
    train.run(config, str(workdir))
  # Forced past the config check, grain's state still cannot fit: was KeyError: 'exhausted'.
  with pytest.raises(
    checkpoint.DataStateMismatchError,
    match=r'data.num_workers=0; this run has data.num_workers=1.*num_workers=0',
  ):
    train.run(config, str(workdir), allow_config_change=True)
  assert checkpoint.finished_steps(workdir) == [2, 4]  # Not mistaken for corruption.


def test_reconstruct_uses_the_stored_config(finished, tmp_path):
  from PIL import Image

  Image.new('RGB', (20, 16), (200, 40, 40)).save(tmp_path / 'red.png')
  done = subprocess.run(
    [sys.executable, '-m', 'triplane3d.reconstruct', f'--workdir={finished.workdir}',
     f'--images={tmp_path / "red.png"}', f'--out={tmp_path / "out"}', '--frames=1',
     '--config.render.chunk=16'],
    capture_output=True, text=True, timeout=300,
    env=subprocess_env(),
  )  # fmt: skip
  # Was a parameter mismatch against the demo config unless --config repeated the run's.
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'stored config' in done.stdout
  assert Image.open(tmp_path / 'out' / 'red.rgb.png').size == (8, 8)  # The run's resolution.


def test_density_death_is_reported_with_the_fix(caplog):
  """A window whose densities underflowed (loss/norm ~ 1e-30, as in a collapsed run) warns with
  the fix; healthy windows, the conv ablation (whose objective reports norm 0: no densities)
  and the 'sum' reduction (another scale) do not."""
  from triplane3d import losses
  from triplane3d.configs import ablations, common

  config = common.get_base_config()
  with caplog.at_level(logging.WARNING):
    assert train.warn_if_densities_died(40, {'norm': 3e-31, 'psnr': 5.3}, config)
  assert 'optim.warmup_steps' in caplog.text and 'step 40' in caplog.text
  assert not train.warn_if_densities_died(40, {'norm': 0.43}, config)
  summed = config.copy_and_resolve_references()
  summed.loss.norm_reduction = 'sum'
  assert not train.warn_if_densities_died(40, {'norm': 3e-31}, summed)
  conv = ablations.get_config('no_triplane')
  recon = {
    'rgb': jnp.zeros((1, 4, 3)),
    'depth': jnp.ones((1, 4, 1)),
    'ray_indices': jnp.arange(4)[None],
  }
  batch = {'rgb': jnp.zeros((1, 2, 2, 3)), 'depth': jnp.ones((1, 2, 2, 1))}
  _, terms = losses.objective(recon, batch, None, None, conv.loss)
  assert float(terms['norm']) == 0.0  # What the conv ablation logs: no densities at all.
  assert not train.warn_if_densities_died(40, {k: float(v) for k, v in terms.items()}, conv)
