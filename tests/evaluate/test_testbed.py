"""The shape-bias testbed (`triplane3d.evaluate.testbed`): its data ties texture to class at
the configured rate, its shifted sets change only the intended factor, its generator seeds are
disjoint, its degraded depth is what it says, and the tiny pipeline runs end to end, resumes
stage by stage and writes a table and figures that agree with the evaluation's numbers."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from xla_env import subprocess_env

from triplane3d import pretrain
from triplane3d.configs import testbed as testbed_config
from triplane3d.configs.eval import common as eval_common
from triplane3d.data import pipeline, synthetic
from triplane3d.evaluate import synthetic_suite, testbed
from triplane3d.render.camera import Camera

TB = testbed_config.get_config('small')


def _tie_rate(scenes) -> float:
  return float(np.mean([s['labels']['label'] == s['labels']['texture_label'] for s in scenes]))


def _binomial_ok(rate: float, p: float, n: int) -> bool:
  return abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize('p', [0.9, 0.5, 0.0])
def test_mixed_textures_tie_texture_to_class_at_the_configured_rate(p):
  n = 3000
  scenes = [
    synthetic.sample_scene(i, 77, texture_mode='mixed', texture_class_prob=p) for i in range(n)
  ]
  # Tied with probability p, else a uniform texture (which is the class's own 1 time in 5).
  expected = p + (1 - p) / len(synthetic.TEXTURES)
  assert _binomial_ok(_tie_rate(scenes), expected, n), (_tie_rate(scenes), expected)


def test_the_teacher_and_every_arm_train_on_the_configured_tie():
  o = testbed.teacher_options(TB, 0)
  assert (o.texture_mode, o.texture_class_prob) == ('mixed', TB.texture_prob)
  # What the teacher really trains on: render_sets with its options (fewer, smaller scenes).
  n = 1500
  sets = pretrain.render_sets(dataclasses.replace(o, num_scenes=n, num_val=8, img_size=28))
  rate = float(np.mean(sets['y'] == sets['tex']))
  assert _binomial_ok(rate, TB.texture_prob + (1 - TB.texture_prob) / 5, n), rate
  for arm in testbed.ARMS[:-1]:
    c = testbed.arm_config(TB, '/out', 0, arm)
    assert c.data.synthetic_texture_prob == TB.texture_prob
    assert pipeline.synthetic_options(c) == {'texture_mode': 'mixed', 'texture_class_prob': 0.9}
  # 'mixed' at 1 is 'class', scene for scene.
  for i in range(50):
    a = synthetic.sample_scene(i, 3, texture_mode='mixed', texture_class_prob=1.0)
    b = synthetic.sample_scene(i, 3, texture_mode='class')
    assert a['labels'] == b['labels']


def test_more_teacher_sees_what_the_arms_see():
  """Same scenes (seed, count, textures), steps and batch as the reconstruction arms."""
  for seed in (0, 2):
    o = testbed.more_teacher_options(TB, seed)
    c = testbed.arm_config(TB, '/out', seed, '3d_prior')
    assert o.scene_seed == c.seed and o.num_scenes == c.data.num_synthetic
    assert (o.steps, o.batch_size) == (c.train.num_steps, c.train.batch_size)
    assert (o.texture_mode, o.texture_class_prob) == ('mixed', c.data.synthetic_texture_prob)
    assert o.seed == seed and o.img_size == c.model.img_size


def _without(scene: dict, factor: str) -> str:
  """The scene's parameters as text, with the object's `factor` (and its label) left out."""
  s = {k: v for k, v in scene.items() if k != 'labels'}
  s['objects'] = [dict(o) for o in scene['objects']]
  s['objects'][0].pop(factor)
  labels = {k: v for k, v in scene['labels'].items() if k != f'{factor}_label'}
  return repr((s, labels))


@pytest.mark.parametrize('factor', ['texture', 'size'])
def test_shifted_sets_change_only_the_intended_factor(factor, tmp_path):
  suite = synthetic_suite.SyntheticSuite(_eval_config(), str(tmp_path))
  shifted = suite.sets[factor]
  scenes = shifted._scenes()
  by_base: dict[int, list] = {}
  for s in scenes:
    by_base.setdefault(s['labels']['base_id'], []).append(s)
  multi = [group for group in by_base.values() if len(group) > 1]
  assert multi, 'no base scene rendered twice'
  for group in multi:
    rest = {_without(s, factor) for s in group}
    assert len(rest) == 1, 'renders of one base scene differ in more than the factor'
    values = [s['labels'][f'{factor}_label'] for s in group]
    assert len(set(values)) == len(values)
  if factor == 'size':  # Only the sizes the probe never trained on.
    train_size = synthetic_suite.SIZE_NAMES.index('medium')
    assert all(s['labels']['size_label'] != train_size for s in scenes)
  else:  # Novel textures: the same size as the training set.
    assert {s['labels']['size_label'] for s in scenes} == {1}


def test_cue_conflict_set_pairs_each_shape_with_another_class_texture(tmp_path):
  suite = synthetic_suite.SyntheticSuite(_eval_config(), str(tmp_path))
  scenes = suite.sets['conflict']._scenes()
  assert all(s['labels']['label'] != s['labels']['texture_label'] for s in scenes)
  assert len({s['labels']['label'] for s in scenes}) == 5


def _eval_config():
  c = eval_common.get_base_config()
  c.img_size = 28
  c.synthetic.num_shift = 60
  return c


def test_generator_seeds_are_disjoint():
  """Teacher, fine-tuning, validation-suite and test-suite scenes never share a seed (nor the
  demo's 0 and 1, nor the shipped stand-in's 3001-3002); too many seeds are refused."""
  groups = testbed.generator_seeds(TB, range(5))
  for split in ('test', 'val'):  # Every set the suite draws is inside its group.
    config = testbed.eval_config(TB, split, '')
    suite = synthetic_suite.SyntheticSuite(config, '/unused')
    assert {v.seed for v in suite.sets.values()} <= groups[
      f'{split} suite'.replace('val ', 'validation ')
    ]
  testbed.check_seeds(TB, range(5))
  union = set().union(*groups.values())
  assert len(union) == sum(len(g) for g in groups.values())
  with pytest.raises(ValueError, match='fine-tuning and validation suite'):
    testbed.check_seeds(TB, range(1001))


def test_degraded_depth_blurs_and_adds_noise_inside_the_camera_range():
  cam = Camera()
  depth = np.full((32, 32), cam.far)
  depth[:, :16] = 2.0  # A step edge.
  same = synthetic.degrade_depth(depth, cam, 0.0, 0.0, np.random.default_rng(0))
  np.testing.assert_array_equal(same, depth)
  blurred = synthetic.degrade_depth(depth, cam, 2.0, 0.0, np.random.default_rng(0))
  # Float64 reference: a 1D Gaussian of σ = 2 across the edge (the rows are constant).
  x = np.arange(-8, 9)
  k = np.exp(-0.5 * (x / 2.0) ** 2)
  k /= k.sum()
  row = np.pad(depth[0], 8, mode='edge')
  np.testing.assert_allclose(blurred[5], np.convolve(row, k, mode='valid'), atol=1e-6)
  noisy = synthetic.degrade_depth(depth, cam, 0.0, 0.05, np.random.default_rng(0))
  assert noisy.min() >= cam.near and noisy.max() <= cam.far
  assert 0.04 < np.std((noisy - depth)[:, :16]) < 0.06  # Left half: never clipped.


def test_block_noise_survives_the_resize_to_the_targets():
  cam = Camera()
  depth = np.full((112, 112), 2.0)
  noisy = synthetic.degrade_depth(depth, cam, 0.0, 0.05, np.random.default_rng(0), 32)
  # Constant over each target pixel's block: the area resize to 32² keeps the std.
  assert len(np.unique(noisy[:3, :3])) == 1
  assert 0.04 < np.std(noisy) < 0.06
  with pytest.raises(ValueError, match='>= 0'):
    synthetic.degrade_depth(depth, cam, -1.0, 0.0, np.random.default_rng(0))


def test_degraded_targets_are_measurably_worse_at_the_renderers_side():
  err = testbed.degraded_target_error(TB, 0, num=8)
  assert err['rmse'] > 0.04 and err['abs'] > 0.02, err


def test_degraded_arm_trains_on_degraded_depth_but_is_scored_on_exact(tmp_path):
  from triplane3d.evaluate import reconstruction

  c = testbed.arm_config(TB, str(tmp_path), 0, 'degraded_depth')
  c.data.num_synthetic = 2
  c.eval.num_heldout = 1
  exact = testbed.arm_config(TB, str(tmp_path), 0, '3d_prior')
  exact.data.num_synthetic = 2
  exact.eval.num_heldout = 1
  for cfg in (c, exact):
    pipeline.prepare(cfg)
  src_deg = pipeline.prepare(c).source
  src_exact = pipeline.prepare(exact).source
  a, b = src_deg[0], src_exact[0]
  assert a['image'] == b['image']  # The same scenes, other depth.
  assert not np.array_equal(a['depth'], b['depth'])
  held = reconstruction.heldout_scenes(c)
  held_exact = reconstruction.heldout_scenes(exact)
  np.testing.assert_array_equal(held['depth'], held_exact['depth'])


def test_one_teacher_serves_every_seed(tmp_path, monkeypatch):
  tb, out = testbed_config.get_config('tiny'), str(tmp_path)
  teachers, arms, evaluated = [], [], {}

  def fake_arm(tb_, out_, seed, name):
    arms.append((seed, name))
    return {'spec': f'{name}-{seed}', 'heldout': {}}

  monkeypatch.setattr(testbed, 'teacher', lambda tb_, out_: teachers.append(out_) or {})
  monkeypatch.setattr(testbed, 'arm', fake_arm)
  monkeypatch.setattr(testbed, 'evaluate', lambda tb_, o, split, specs: evaluated.update(specs))
  monkeypatch.setattr(testbed, 'report', lambda *args: 'md')
  testbed.run(tb, out, [0, 1, 2], 'test')
  assert teachers == [out]  # Once, not per seed.
  assert sorted(arms) == sorted((s, n) for s in range(3) for n in testbed.ARMS)
  assert [k for k in evaluated if k.startswith('teacher')] == [f'teacher-s{tb.teacher.seed}']
  shared = os.path.join(out, 'teacher', 'backbone.safetensors')
  assert evaluated[f'teacher-s{tb.teacher.seed}'] == shared
  for seed in range(3):  # Every reconstruction arm of every seed starts from (and distils to) it.
    for name in testbed.ARMS[:-1]:
      assert testbed.arm_config(tb, out, seed, name).model.init_from == shared


def test_resuming_with_another_config_is_refused(tmp_path):
  tb = testbed_config.get_config('tiny')
  testbed.check_workdir(tb, str(tmp_path))
  testbed.check_workdir(tb, str(tmp_path))  # Same config: fine.
  tb.finetune.steps = 3
  with pytest.raises(ValueError, match=r'finetune\.steps: 2 → 3'):
    testbed.check_workdir(tb, str(tmp_path))
  with pytest.raises(ValueError, match='must not contain'):
    testbed.run(tb, str(tmp_path / 'a,b'), [0])


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """The whole tiny pipeline through its command line, in a one-device process (the test
  process's 8 fake devices would make every program slower to compile)."""
  out = str(tmp_path_factory.mktemp('testbed'))
  cmd = [sys.executable, '-m', 'triplane3d.evaluate.testbed', f'--workdir={out}', '--size=tiny']
  proc = subprocess.run(
    [*cmd, '--seeds=1', '--split=test'], capture_output=True, text=True, env=subprocess_env()
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, 'test', 'results.md')) as f:
    md = f.read()
  assert md.strip() in proc.stdout  # The command prints the table it wrote.
  return testbed_config.get_config('tiny'), out, md


@pytest.mark.slow
def test_tiny_run_writes_a_consistent_table_and_figures(tiny_run):
  _, out, md = tiny_run
  d = os.path.join(out, 'test')
  with open(os.path.join(d, 'results.json')) as f:
    results = json.load(f)
  with open(os.path.join(d, 'eval', 'results.json')) as f:
    summary = json.load(f)
  rows = [line.split('|')[1].strip() for line in md.splitlines() if line.startswith('| ')]
  assert rows[1:] == list(testbed.ROWS)  # Header, then teacher and every arm.
  for row in testbed.ROWS:
    metrics = summary['results'][f'{row}-s0']['synthetic']['metrics']
    for key in ('test_top1', 'shape_bias', 'depth_rmse'):
      assert results['per_seed'][row][key] == [metrics[key]]
      assert results['stats'][row][key]['mean'] == pytest.approx(metrics[key])
    line = next(ln for ln in md.splitlines() if ln.startswith(f'| {row} |'))
    assert f'| {100 * metrics["shape_bias"]:.1f} |' in line  # One seed: no spread shown.
  for row in testbed.ROWS:  # Every backbone has both read-outs, as top-1 fractions.
    for key in ('shape_readout', 'texture_readout'):
      assert 0.0 <= results['per_seed'][row][key][0] <= 1.0
  for arm in testbed.ARMS[:-1]:  # Reconstruction arms report held-out metrics.
    assert results['per_seed'][arm]['heldout_psnr'][0] > 0
  assert results['per_seed']['more_teacher']['heldout_psnr'] == [None]
  for name in ('shape_bias.png', 'reconstructions.png'):
    with Image.open(os.path.join(d, name)) as im:
      assert im.width > 200 and im.height > 200
  assert set(results['wall_s']) == {'teacher', 'arms', 'evaluate_test', 'total'}
  assert results['wall_s']['total'] == pytest.approx(
    sum(v for k, v in results['wall_s'].items() if k != 'total')
  )
  assert "degraded_depth arm's targets against the exact ones" in md


def test_cells_show_the_sample_std_only_with_two_values_or_more():
  assert testbed._cell([0.5, 0.7], 'percent') == '60.0 ± 14.1'  # ddof=1: sqrt(0.02) = 0.141.
  assert testbed._cell([0.5, None], 'percent') == '50.0'
  assert testbed._cell([20.0, 22.0], 'db') == '21.00 ± 1.41'
  assert testbed._cell([0.125], 'float') == '0.1250'
  assert testbed._cell([None], 'float') == '–'


def test_stages_resume(tiny_run, monkeypatch):
  tb, out, _ = tiny_run
  teacher_file = os.path.join(out, 'teacher', 'backbone.safetensors')
  before = os.path.getmtime(teacher_file)
  ckpts = os.path.join(out, 'arms', 'seed0', 'rgb_only', 'checkpoints')
  ckpt_before = os.listdir(ckpts)
  # Lose one arm's completion (as if it was interrupted) and the report.
  os.remove(os.path.join(out, 'arms', 'seed0', 'rgb_only', 'done.json'))
  os.remove(os.path.join(out, 'test', 'results.md'))
  trained = []
  real_arm = testbed.arm

  def spy(tb_, out_, seed, name):
    done = os.path.exists(os.path.join(out_, 'arms', f'seed{seed}', name, 'done.json'))
    if not done:
      trained.append(name)
    return real_arm(tb_, out_, seed, name)

  def no_teacher(*a, **k):
    raise AssertionError('the teacher was trained again')

  monkeypatch.setattr(testbed, 'arm', spy)
  monkeypatch.setattr(pretrain, 'train', no_teacher)
  md = testbed.run(tb, out, [0], 'test')
  assert trained == ['rgb_only']
  # Resumed from its last checkpoint (no step trained again), its held-out metrics kept.
  with open(os.path.join(out, 'arms', 'seed0', 'rgb_only', 'done.json')) as f:
    record = json.load(f)
  assert record['step'] == tb.finetune.steps and record['heldout']['psnr'] > 0
  assert os.listdir(ckpts) == ckpt_before
  assert os.path.getmtime(teacher_file) == before
  assert os.path.exists(os.path.join(out, 'test', 'results.md')) and '| rgb_only |' in md


def test_cue_readout_finds_the_cue_the_features_carry():
  rng = np.random.default_rng(0)

  def fake(n):
    shape, texture = rng.integers(0, 5, n), rng.integers(0, 5, n)
    patch_mean = rng.normal(size=(n, 8))
    patch_mean[:, :5] += 3 * np.eye(5)[texture]  # Texture is written in; shape is not.
    cls = rng.normal(size=(n, 4, 6))
    return {
      'cls': cls,
      'patch_mean': patch_mean,
      'meta_label': shape,
      'meta_texture_label': texture,
    }

  r = testbed.cue_readout(fake(400), fake(200), fake(400))
  assert r['texture_readout'] > 0.9
  assert abs(r['shape_readout'] - 0.2) < 0.1
