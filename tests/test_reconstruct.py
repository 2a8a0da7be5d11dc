"""`python -m triplane3d.reconstruct` on a tiny trained run, `checkpoint.restore_params`, and the
readable image grids of `summaries` (tile size, header, depth colour map and colour bar)."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image, ImageSequence
from tiny import tiny_config
from xla_env import subprocess_env

from triplane3d import checkpoint, reconstruct, summaries, train
from triplane3d.convert import export
from triplane3d.data import transforms
from triplane3d.models.prior3d import Prior3D
from triplane3d.render.camera import Camera

REPO = Path(__file__).resolve().parent.parent
TRAIN = {'train.num_steps': 2, 'train.ckpt_every_steps': 1}  # Checkpoints at steps 1 and 2.


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 2-step tiny run: its config, data dir, workdir and final params."""
  data_dir = str(tmp_path_factory.mktemp('synthetic'))
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(data_dir, **TRAIN)
  result = train.run(config, workdir)
  assert result['step'] == 2
  return {
    'config': config,
    'data_dir': data_dir,
    'workdir': workdir,
    'params': jax.tree.map(np.asarray, result['state']['params']),
  }


def _cli(run, *args):
  config = f'--config={REPO}/tests/tiny.py:{run["data_dir"]}'
  overrides = [f'--config.{k}={v}' for k, v in TRAIN.items()]
  cmd = [sys.executable, '-m', 'triplane3d.reconstruct', config, *overrides]
  cmd += [f'--workdir={run["workdir"]}', *args]  # A later --workdir wins.
  return subprocess.run(
    cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300
  )


def _reference_depth(config, params, path):
  """Depth (R, R) by the model's own full render of the image, preprocessed here."""
  model = Prior3D.from_config(config)
  size = config.model.img_size
  with Image.open(path) as img:
    pixels = np.asarray(img.convert('RGB').resize((size, size), Image.Resampling.BILINEAR))
  x = (pixels.astype(np.float32) / 255.0 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
  out = jax.jit(
    lambda p, x: model.reconstruct(
      p, model.representation(p['backbone'], x), jax.random.key(0), full=True
    )
  )(params, x[None])
  r = config.render.resolution
  return np.asarray(out['rgb']).reshape(r, r, 3), np.asarray(out['depth']).reshape(r, r)


def test_cli_writes_every_output_and_the_models_own_depth(run, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (37, 61, 3), np.uint8)).save(images / 'wide.png')
  Image.fromarray(rng.integers(0, 256, (40, 40), np.uint8), mode='L').save(images / 'grey.png')
  (images / 'broken.png').write_bytes(b'not an image')
  out = tmp_path / 'out'

  proc = _cli(run, f'--images={images}/*.png', f'--out={out}')
  # One image is unreadable: skipped, reported at the end, exit status 1; the others written.
  assert proc.returncode == 1, proc.stderr
  assert 'done: 2 reconstructed, 1 skipped as unreadable.' in proc.stdout, proc.stdout
  assert 'broken.png' in proc.stderr
  assert len([line for line in proc.stdout.splitlines() if '.png' in line]) == 3  # One per image.

  config = run['config']
  r = config.render.resolution
  camera = Camera.from_config(config.camera)
  lo, hi = camera.sample_range
  for name in ('wide', 'grey'):
    for ext in ('rgb.png', 'depth.npy', 'depth.png', 'views.gif'):
      assert (out / f'{name}.{ext}').is_file(), f'{name}.{ext} missing'
    depth = np.load(out / f'{name}.depth.npy')
    assert depth.dtype == np.float32 and depth.shape == (r, r)
    # Scene units along the ray, within the sampled range (not normalised to [0, 1]).
    assert lo <= depth.min() and depth.max() <= hi, (depth.min(), depth.max())
    with Image.open(out / f'{name}.rgb.png') as im:
      assert im.size == (r, r) and im.mode == 'RGB'
      rgb_png = np.asarray(im)
    with Image.open(out / f'{name}.depth.png') as im:
      assert im.size == (r, r)
      colours = summaries.colorize_depth(depth, camera.near, camera.far)
      np.testing.assert_array_equal(np.asarray(im.convert('RGB')), colours)
    with Image.open(out / f'{name}.views.gif') as im:
      assert im.n_frames >= 8
      sizes = {f.size for f in ImageSequence.Iterator(im)}
      assert len(sizes) == 1 and min(sizes.pop()) >= summaries.MIN_TILE
    ref_rgb, ref_depth = _reference_depth(config, run['params'], images / f'{name}.png')
    np.testing.assert_allclose(depth, ref_depth, atol=1e-5, rtol=0)
    np.testing.assert_allclose(rgb_png, np.clip(ref_rgb, 0, 1) * 255, atol=0.51)
  assert not (out / 'broken.depth.npy').exists()


def test_cli_errors_are_one_clear_line(run, tmp_path):
  empty = tmp_path / 'not_a_run'
  empty.mkdir()
  image = tmp_path / 'a.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  proc = _cli(run, f'--images={image}', f'--out={tmp_path / "out"}', f'--workdir={empty}')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith('error: no finished checkpoint under')
  assert 'Traceback' not in proc.stderr


def test_restore_params_and_its_errors(run, tmp_path):
  step, params = checkpoint.restore_params(run['workdir'], config=run['config'])
  assert step == 2
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(run['params']), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
  assert checkpoint.restore_params(run['workdir'], 1)[0] == 1
  # export reads the backbone through the same function.
  backbone = export.backbone_from_checkpoint(run['workdir'])
  for a, b in zip(jax.tree.leaves(backbone), jax.tree.leaves(run['params']['backbone'])):
    np.testing.assert_array_equal(a, b)

  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 7 .*have steps \[1, 2\]'):
    checkpoint.restore_params(run['workdir'], 7)
  with pytest.raises(FileNotFoundError, match='no finished checkpoint under'):
    checkpoint.restore_params(str(tmp_path))
  other = tiny_config(run['data_dir'], **{'decoder.plane_channels': 4})
  with pytest.raises(ValueError, match=r'shape mismatch: mlp/hidden/kernel: expected \(4, 16\)'):
    checkpoint.restore_params(run['workdir'], config=other)


def test_image_discovery_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no image files match'):
    reconstruct.find_images(str(tmp_path / '*.jpg'))
  (tmp_path / 'a').mkdir()
  for p in ('a/x.png', 'x.jpg', 'notes.txt'):
    (tmp_path / p).write_bytes(b'')
  # A directory contributes its image files only.
  assert reconstruct.find_images(str(tmp_path)) == [str(tmp_path / 'x.jpg')]
  with pytest.raises(ValueError, match='share output names'):
    reconstruct.check_unique_names([str(tmp_path / 'a/x.png'), str(tmp_path / 'x.jpg')])


def _project(camera, point_3):
  """A world point's normalised image coordinates (u, v) under `camera` (OpenCV pinhole)."""
  cam = (np.asarray(point_3, np.float64) - np.asarray(camera.position)) @ camera.rotation_matrix
  return np.asarray(
    [camera.fx * cam[0] / cam[2] + camera.cx, camera.fy * cam[1] / cam[2] + camera.cy]
  )


def test_orbit_turns_about_the_box_centre():
  cam = Camera()
  center = np.asarray(cam.box_center)
  angles = reconstruct.orbit_angles(20, 30.0)
  assert angles[0] == -30.0 and angles[10] == 30.0 and angles[5] == 0.0
  assert np.all(np.abs(angles) <= 30.0)
  assert reconstruct.orbit_camera(cam, 0.0) == cam
  for yaw in (-30.0, 12.5, 30.0):
    turned = reconstruct.orbit_camera(cam, yaw)
    dist = np.linalg.norm(np.asarray(turned.position) - center)
    assert dist == pytest.approx(np.linalg.norm(np.asarray(cam.position) - center))
    np.testing.assert_allclose(_project(turned, center), [0.5, 0.5], atol=1e-12)  # In view.
    # Turned about the vertical axis: the camera's y axis stays the world's y axis.
    np.testing.assert_allclose(turned.rotation_matrix[:, 1], [0, 1, 0], atol=1e-12)
    forward = turned.rotation_matrix[:, 2]
    assert np.degrees(np.arccos(forward[2])) == pytest.approx(abs(yaw))
  assert reconstruct.orbit_camera(cam, 30.0).position[0] < 0  # Positive yaw: towards −x.


def test_unturned_view_reproduces_the_models_render(run):
  """`render_view` from explicit rays is the renderer's own image at the configured camera."""
  config = run['config']
  _, params = checkpoint.restore_params(run['workdir'], config=config)
  recon = reconstruct.Reconstructor(config, params, num_frames=4, max_angle=30.0)
  assert list(recon.angles) == [-30.0, 0.0, 30.0, 0.0]
  image = np.random.default_rng(1).normal(size=(config.model.img_size,) * 2 + (3,))
  result = recon(image.astype(np.float32))
  yaw, rgb0, depth0 = result['frames'][1]
  assert yaw == 0.0
  np.testing.assert_allclose(depth0, result['depth'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(rgb0, result['rgb'], atol=1e-5, rtol=0)
  assert not np.allclose(result['frames'][0][2], result['depth'])  # Turned views differ.


def test_colorize_depth_maps_near_to_far_along_the_map():
  near, far = 1.5, 2.5
  ramp = np.linspace(near, far, 33)[None]
  colours = summaries.colorize_depth(ramp, near, far)[0].astype(np.float64)
  assert colours.shape == (33, 3)
  np.testing.assert_array_equal(colours[0], [68, 1, 84])  # Viridis' first colour...
  np.testing.assert_array_equal(colours[-1], [253, 231, 37])  # ...and its last.
  luminance = colours @ [0.2126, 0.7152, 0.0722]
  assert np.all(np.diff(luminance) > 0)  # Monotone: depth order survives in grey.
  # Out of range clips to the ends; (H, W, 1) works like (H, W); non-finite is black.
  d = np.asarray([[near - 1, far + 1, np.nan]])
  out = summaries.colorize_depth(d[..., None], near, far)
  np.testing.assert_array_equal(out[0], [[68, 1, 84], [253, 231, 37], [0, 0, 0]])
  assert out.dtype == np.uint8
  with pytest.raises(ValueError, match='far > near'):
    summaries.colorize_depth(ramp, far, near)


def test_grid_tiles_are_large_with_a_header_and_a_colour_bar():
  b, r, s, near, far = 2, 8, 28, 1.5, 2.5
  red, blue = np.zeros((b, r, r, 3), np.float32), np.zeros((b, r, r, 3), np.float32)
  red[..., 0], blue[..., 2] = 1.0, 1.0
  grey_input = (0.5 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD
  images = np.broadcast_to(grey_input, (b, s, s, 3))
  depth = np.full((b, r, r, 1), 2.0, np.float32)
  grid = summaries.reconstruction_grid(images, red, depth, blue, depth, near, far)
  assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3

  def boxes(colour):
    """(top, bottom, left, right) of each example's tile of exactly `colour`."""
    mask = np.all(grid == colour, axis=-1)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    assert mask.sum() == b * len(cols) ** 2  # b square tiles, stacked in one column.
    return rows, cols

  rows, red_cols = boxes([255, 0, 0])
  _, blue_cols = boxes([0, 0, 255])
  tile = len(red_cols)
  assert tile >= summaries.MIN_TILE and tile % r == 0  # An integer enlargement.
  assert len(blue_cols) == tile
  # The header: text (dark pixels) above the rendered and target RGB columns.
  header = grid[: rows[0]]
  assert rows[0] >= 8
  dark = header.max(axis=-1) < 100
  assert dark[:, red_cols].any() and dark[:, blue_cols].any()
  assert dark[:, : red_cols[0]].any()  # Above the input column too.
  # The colour bar right of the last tile: far's colour at its top, near's at its bottom.
  right = grid[rows[0] :, blue_cols[-1] + 1 :]
  assert np.all(right == [253, 231, 37], axis=-1)[0].any()
  assert np.all(right == [68, 1, 84], axis=-1)[-1].any()


def test_load_image_decodes_like_training(tmp_path):
  # reconstruct reads files through the training decoder: a 16-bit greyscale PNG is the same
  # picture as its 8-bit version (PIL's own I;16 → RGB conversion clips it to near white).
  ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
  Image.fromarray(ramp).save(tmp_path / 'deep.png')
  Image.fromarray(np.round(ramp / 257).astype(np.uint8)).convert('RGB').save(tmp_path / 'flat.png')
  np.testing.assert_allclose(
    reconstruct.load_image(str(tmp_path / 'deep.png'), 28),
    reconstruct.load_image(str(tmp_path / 'flat.png'), 28),
    atol=1e-5,
  )
