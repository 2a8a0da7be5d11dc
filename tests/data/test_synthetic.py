"""Synthetic scenes: exact depth (against independent analytic / implicit-surface checks),
determinism to the byte, cue-conflict and single-factor labels, and the stored format."""

import os

import numpy as np
import pytest

from triplane3d.data import depth_format, records, scenes, synthetic
from triplane3d.render.camera import Camera

CAM = Camera()


def _scene(shape, center=(0.05, -0.03, 2.0), size=0.3, rotation=None):
  tex = {'colors': np.ones((2, 3)) * 0.5, 'freq': 4.0, 'dirs': np.eye(3), 'phase': np.zeros(3)}
  obj = dict(shape=shape, texture='checker', size=size, center=np.asarray(center))
  obj.update(rotation=np.eye(3) if rotation is None else rotation, aspect=np.ones(3), tex=tex)
  light = np.asarray([0, 0, -1.0])
  return {'objects': [obj], 'background': 'flat', 'bg_tex': tex, 'light': light, 'ambient': 0.3}


def _render(shape, res=48, **kw):
  s = _scene(shape, **kw)
  return s, synthetic.render(s, CAM, res)[1]


def test_sphere_depth_equals_analytic_ray_distance():
  c, r = np.asarray([0.05, -0.03, 2.0]), 0.3
  _, depth = _render('sphere', center=c, size=r)
  o, d = CAM.rays(48)
  b = np.sum((o - c) * d, -1)
  disc = b**2 - (np.sum((o - c) ** 2, -1) - r**2)
  hit = disc > 0
  t = -b - np.sqrt(np.where(hit, disc, 0))
  assert 300 < hit.sum() < 48 * 48 - 300  # Both object and background are in view.
  np.testing.assert_allclose(depth[hit], t[hit], rtol=1e-12)
  np.testing.assert_array_equal(depth[~hit], CAM.far)


@pytest.mark.parametrize('shape', ['box', 'cylinder', 'cone', 'torus'])
def test_hit_points_lie_on_the_primitive_surface(shape):
  rot = synthetic._rotation(np.random.default_rng(3))
  c, size = np.asarray([0.05, -0.03, 2.0]), 0.3
  _, depth = _render(shape, center=c, size=size, rotation=rot)
  o, d = CAM.rays(48)
  hit = depth < CAM.far
  assert hit.sum() > 100
  p = ((o + depth[..., None] * d)[hit] - c) @ rot  # Local coordinates.
  x, y, z = p.T
  rho = np.hypot(x, z)
  if shape == 'box':
    err = np.abs(np.abs(p).max(-1) - size / np.sqrt(3))
  elif shape == 'cylinder':
    r, h = 0.6 * size, 0.75 * size
    err = np.minimum(np.abs(rho - r) + np.maximum(np.abs(y) - h, 0), np.abs(np.abs(y) - h))
    assert (rho <= r + 1e-9).all() and (np.abs(y) <= h + 1e-9).all()
  elif shape == 'cone':
    r, h = 0.7 * size, 0.7 * size
    err = np.minimum(np.abs(rho - r * (h - y) / (2 * h)), np.abs(y + h))
  else:
    big, small = 0.68 * size, 0.3 * size
    err = np.abs(np.hypot(rho - big, y) - small)  # Torus signed distance.
  assert err.max() < 1e-9, err.max()
  # And it is the *first* surface: the point slightly in front is outside the primitive.
  o_l, d_l = (o[hit] - c) @ rot, d[hit] @ rot
  t_front, _ = scenes.intersect(shape, o_l, d_l, size)
  np.testing.assert_allclose(t_front, depth[hit], rtol=1e-12)
  assert not (depth[~hit] < CAM.far).any()


def test_same_seed_same_bytes_and_stored_depth_exact(tmp_path):
  for sub, seed in (('a', 1), ('b', 1), ('c', 2)):
    synthetic.ensure_dataset(str(tmp_path / sub), 40, seed, CAM, 32)
  synthetic.ensure_dataset(str(tmp_path / 'a'), 40, 1, CAM, 32)  # Idempotent.
  with pytest.raises(ValueError, match='generated with'):
    synthetic.ensure_dataset(str(tmp_path / 'a'), 41, 1, CAM, 32)

  def blobs(sub):
    out = []
    for name in (synthetic.NAME, synthetic.DEPTH_NAME):
      path = records.shard_path(str(tmp_path / sub), name, 'train', 0, 1)
      out.append(open(path, 'rb').read())
    return out

  assert blobs('a') == blobs('b') and blobs('a')[0] != blobs('c')[0]
  depth = records.open_split(str(tmp_path / 'a'), synthetic.DEPTH_NAME, 'train')
  images = records.open_split(str(tmp_path / 'a'), synthetic.NAME, 'train')
  assert len(depth) == len(images) == 40
  for i in (0, 17):
    exact = synthetic.render(synthetic.sample_scene(i, 1), CAM, 32)[1]
    rec = depth[i]
    got = depth_format.decode(rec['depth'], rec['depth_range'])
    assert rec['key'].decode() == images[i]['file_name'].decode() == f'scene_{i:07d}'
    np.testing.assert_allclose(got, exact, atol=depth_format.max_quantisation_error([1.5, 2.5]))
  assert not any(n.startswith('.tmp') for n in os.listdir(tmp_path / 'a'))


def test_cue_conflict_and_single_factor_labels():
  for i in range(20):
    s = synthetic.sample_scene(i, 0, texture_mode='conflict')
    lab = s['labels']
    assert lab['label'] != lab['texture_label']
    assert s['objects'][0]['shape'] == synthetic.SHAPES[lab['label']]
    assert s['objects'][0]['texture'] == synthetic.TEXTURES[lab['texture_label']]
    assert synthetic.sample_scene(i, 0)['labels']['texture_label'] == lab['label']  # 'class'.
  img, _ = synthetic.example(3, 0, CAM, 16, texture_mode='conflict')
  assert img['label'] != img['texture_label']
  a, b = (synthetic.sample_scene(i, 0, variation='size') for i in (3, 4))  # Same base scene.
  assert a['labels']['base_id'] == b['labels']['base_id']
  assert a['labels']['size_label'] != b['labels']['size_label']
  assert a['objects'][0]['texture'] == b['objects'][0]['texture']
  np.testing.assert_array_equal(a['objects'][0]['center'], b['objects'][0]['center'])


def test_depth_format_round_trip_error_bound():
  d = np.random.default_rng(0).uniform(0.3, 9.7, (37, 53))
  d[0, 0] = np.inf
  rec = depth_format.encode(d, 'k')
  got = depth_format.decode(rec['depth'], rec['depth_range'])
  fin = np.isfinite(d)
  err = np.abs(got[fin] - d[fin]).max()
  assert err <= depth_format.max_quantisation_error(rec['depth_range'])
  assert got[0, 0] == pytest.approx(d[fin].max(), rel=1e-5)


def test_demo_config_generates_on_first_use_and_reads_like_tfds(tmp_path):
  from triplane3d.configs import demo
  from triplane3d.data import pipeline

  c = demo.get_config()
  c.workdir, c.data.num_synthetic, c.depth.normalize = str(tmp_path), 40, 'none'
  data = pipeline.prepare(c)  # Generates into <workdir>/data.
  b = next(pipeline.create(c, data, process_count=1))
  s, r = c.model.img_size, c.render.resolution
  assert b['image'].shape == (16, s, s, 3) and b['depth'].shape == (16, r, r, 1)
  assert records.is_prepared(str(tmp_path / 'data'), synthetic.DEPTH_NAME)
  assert data.num_examples == 40
  assert pipeline.prepare(c).num_examples == 40  # Second use: the existing dataset is reused.
  assert (b['depth'] <= CAM.far).all() and (b['depth'] > CAM.near).any()
