"""The camera's frustum stays inside the triplane box for every shipped config.

Outside the box the plane lookup returns zeros, so a ray that leaves the box before the end of
its sampled range cannot place its depth (or its background) beyond the exit point.
"""

import glob
import importlib.util
import os

import numpy as np
import pytest

from triplane3d.render.camera import Camera
from triplane3d.render.renderer import RenderOptions

CONFIG_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')
ABLATIONS = ('no_triplane', 'no_distill', 'scratch', 'subset100k', 'subset500k')


def _configs():
  for path in sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py'))):
    name = os.path.basename(path)[:-3]
    if name in ('__init__', 'common'):
      continue
    spec = importlib.util.spec_from_file_location(f'cfg_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if name == 'testbed':  # Not a training config: the training configs of its arms.
      from triplane3d.evaluate import testbed

      for size in ('small', 'tiny'):
        for arm in testbed.ARMS[:-1]:
          yield f'testbed:{size}:{arm}', testbed.arm_config(module.get_config(size), '', 0, arm)
      continue
    for arg in ABLATIONS if name == 'ablations' else (None,):
      yield f'{name}:{arg}' if arg else name, module.get_config(*([arg] if arg else []))


CONFIGS = list(_configs())


def _inside_fraction(camera: Camera, resolution: int, num_t: int = 33) -> float:
  """Fraction of (pixel ray, t) points inside the box, t on a grid over the sampled range."""
  origins, dirs = camera.rays(resolution)
  t = np.linspace(*camera.sample_range, num_t)
  pts = origins[..., None, :] + dirs[..., None, :] * t[:, None]
  rel = np.abs(pts - np.asarray(camera.box_center)) * (2.0 / camera.box_size)
  return float(np.mean(np.all(rel <= 1.0, axis=-1)))


def test_every_config_is_checked():
  names = [n for n, _ in CONFIGS]
  assert {'demo', 'vits', 'vitb', 'vitl', 'ablations:no_distill'} <= set(names)


@pytest.mark.parametrize('name,config', CONFIGS, ids=[n for n, _ in CONFIGS])
def test_config_frustum_inside_box(name, config):
  camera = Camera.from_config(config.camera)
  camera.check_frustum_in_box()  # The start-up check passes...
  # ...and, independently of it, every pixel's ray is inside at every sampled depth.
  assert _inside_fraction(camera, 64) == 1.0
  near, far = camera.sample_range
  assert near < camera.near and far > camera.far  # Targets at near / far are reachable.


def test_old_default_is_refused_with_a_fix():
  """The first default (fx = 1.5, unit box at z = 2): most rays left the box before far."""
  old = Camera(fx=1.5, fy=1.5, box_size=1.0, margin=0.0)
  assert _inside_fraction(old, 64) < 0.6
  with pytest.raises(ValueError, match=r'box_size >= 1\.508'):
    old.check_frustum_in_box()
  cfg = CONFIGS[0][1].render
  with pytest.raises(ValueError, match='frustum leaves the triplane box'):
    RenderOptions.from_config(cfg, old)


def test_corner_check_agrees_with_dense_check():
  """The 8-corner check and the dense per-pixel check agree on random cameras."""
  rng = np.random.default_rng(0)
  for _ in range(40):
    cam = Camera(
      fx=rng.uniform(1.0, 3.0),
      fy=rng.uniform(1.0, 3.0),
      box_size=rng.uniform(0.8, 2.5),
      margin=rng.uniform(0.0, 0.2),
    )
    try:
      cam.check_frustum_in_box()
      ok = True
    except ValueError:
      ok = False
    # Pixel centres stop half a pixel short of the corners: only a near-tight box may differ.
    rel = np.abs(cam.frustum_corners() - np.asarray(cam.box_center)).max() * 2 / cam.box_size
    if abs(rel - 1.0) > 0.02:
      assert ok == (_inside_fraction(cam, 64) == 1.0)


@pytest.mark.parametrize('rotated', [False, True])
def test_frustum_to_box_maps_each_pixel_ray_to_its_image_position(rotated):
  # Independent of the warp's formula: rays are built from pixel centres, so every point on the
  # ray of pixel (i, j) must land at box coordinates ((j + ½)/R, (i + ½)/R) scaled to the box,
  # and the third coordinate must follow the distance t linearly over the sampled range.
  c, s = np.cos(0.3), np.sin(0.3)
  rot = (c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c) if rotated else Camera().rotation
  cam = Camera(rotation=rot, position=(0.2, -0.1, 0.3) if rotated else (0.0, 0.0, 0.0))
  r = 9
  origins, dirs = cam.rays(r)
  t = np.linspace(*cam.sample_range, 5)
  pts = origins[..., None, :] + dirs[..., None, :] * t[:, None]  # (R, R, T, 3)
  unit = (cam.frustum_to_box(pts) - np.asarray(cam.box_center)) / (cam.box_size / 2)
  i, j = np.meshgrid(np.arange(r), np.arange(r), indexing='ij')
  np.testing.assert_allclose(
    unit[..., 0], np.broadcast_to((2 * (j + 0.5) / r - 1)[..., None], unit.shape[:-1]), atol=1e-12
  )
  np.testing.assert_allclose(
    unit[..., 1], np.broadcast_to((2 * (i + 0.5) / r - 1)[..., None], unit.shape[:-1]), atol=1e-12
  )
  np.testing.assert_allclose(
    unit[..., 2], np.broadcast_to(np.linspace(-1, 1, 5), unit.shape[:-1]), atol=1e-12
  )
  behind = cam.frustum_to_box(np.asarray(cam.position) - 1.0 * dirs[0, 0])
  assert np.all(np.abs(behind - np.asarray(cam.box_center)) > cam.box_size / 2)
