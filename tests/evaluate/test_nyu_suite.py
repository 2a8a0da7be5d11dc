"""The nyu_depth suite on a folder in DINOv2's (the depth toolbox's) layout: list files, 16-bit
millimetre PNGs, 'None' lines, Eigen's crop; the ridge probe end to end; a missing folder."""

import numpy as np
import pytest
from PIL import Image

from triplane3d.configs.eval import common
from triplane3d.evaluate import datasets, nyu_suite, runner


def _frame(root, rel, rgb, depth_m):
  (root / rel).parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(rgb, np.uint8)).save(root / f'{rel}.jpg', quality=95)
  Image.fromarray(np.round(np.asarray(depth_m) * 1000).astype(np.uint16)).save(root / f'{rel}.png')
  return f'/{rel}.jpg /{rel}.png 518.8579'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """12 train and 6 test frames of 30×44: depth (metres) follows each half's brightness."""
  root = tmp_path_factory.mktemp('nyu')
  rng = np.random.default_rng(0)

  def scene(rel):
    left, right = rng.uniform(40, 220, 2)
    img = np.concatenate([np.full((30, 22, 3), left), np.full((30, 22, 3), right)], axis=1)
    return _frame(root, rel, img, 1.0 + img[..., 0] / 64.0)

  train = [scene(f'kitchen_0001/rgb_{i:05d}') for i in range(24)]
  train.insert(3, '/kitchen_0001/rgb_99999.jpg None 518.8579')  # No depth: skipped.
  (root / 'nyu_train.txt').write_text('\n'.join(train) + '\n')
  (root / 'nyu_test.txt').write_text('\n'.join(scene(f'office/rgb_{i:05d}') for i in range(6)))
  return root


def test_reader_scales_depth_and_skips_missing(folder):
  s = nyu_suite.NyuFolder('t', str(folder), 'nyu_train.txt', 28, depth_sub=14, eigen_crop=False)
  assert len(s) == 24 and s.images(0, 2).shape == (2, 28, 28, 3)
  meta = s.meta()
  assert meta['depth'].shape == (24, 28, 28)
  # Depth = 1 + red / 64 (millimetre PNGs / 1000); JPEG moves red by a few levels at most.
  # Columns 12-15 straddle the halves' edge, blended in the image but not in the depth.
  red = s.images(0, 24)[..., 0].astype(np.float64)
  away = np.r_[0:12, 16:28]
  np.testing.assert_allclose(meta['depth'][..., away], 1.0 + red[..., away] / 64.0, atol=0.12)


def test_eigen_crop_masks_the_border():
  depth = np.full((480, 640), 2.0, np.float32)
  d = datasets.prepare_depth(depth, 224, 14, eigen_crop=True)
  # 480×640 → 256×341, centre 224 crop: Eigen's top row 45 lands at 45·256/480 − 16 = 8.
  assert (d[:8] == 0).all() and (d[9:] == 2.0).all()
  with pytest.raises(ValueError, match='eigen_crop=False'):
    datasets.prepare_depth(depth[:100], 224, 14, eigen_crop=True)


def test_ridge_probe_on_folder(folder, tmp_path):
  c = common.get_base_config()
  c.suites, c.backbones, c.img_size, c.batch_size = 'nyu_depth', 'random:vit_tiny14', 28, 16
  n = c.nyu_depth
  n.folder, n.probe, n.eigen_crop, n.max_depth = str(folder), 'ridge', False, 5.0
  n.num_train, n.num_val, n.num_test = 16, 8, 0
  r = runner.run(c, str(tmp_path))['results']['random-vit_tiny14']['nyu_depth']
  assert r['protocol']['depth_probe'] == 'ridge'
  assert set(r['protocol']['sets']) == {'depth_train', 'depth_val', 'depth_test'}
  assert r['protocol']['sets']['depth_test']['num_frames'] == 6
  assert r['metrics']['rmse'] < 0.8 * r['baselines']['rmse'][0]
  assert 'NYU depth RMSE (ridge)' in (tmp_path / 'results.md').read_text()


def test_missing_folder_names_the_fix(tmp_path):
  c = common.get_base_config()
  c.suites, c.backbones, c.nyu_depth.folder = 'nyu_depth', 'random:vit_tiny14', str(tmp_path)
  with pytest.raises(datasets.DatasetMissingError, match=r'nyu_train\.txt') as info:
    runner.Run(c, str(tmp_path / 'out'))
  assert 'nyu_depth.folder' in str(info.value)
