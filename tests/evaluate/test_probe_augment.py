"""DINOv2's linear-probe training augmentation: torchvision's RandomResizedCrop sampling, views
fixed by (seed, epoch, image), per-epoch features streamed into the grid, and the mode labelled
in results.json and results.md (augmented here; fast in test_suite_real)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from triplane3d.configs.eval import synthetic
from triplane3d.evaluate import augment, features, runner


def test_crop_box_follows_torchvision():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = augment.crop_box(64, 48, rng)
    assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
    # round() moves the sampled area and ratio a little: the bounds hold up to it.
    assert 0.08 * 64 * 48 * 0.8 <= h * w <= 64 * 48
    assert 3 / 4 - 0.2 <= w / h <= 4 / 3 + 0.2
  # No sampled crop fits a 100×1 strip in 10 tries: the centre crop, ratio clamped to 4/3.
  assert augment.crop_box(100, 1, rng) == (0, 49, 1, 1)
  assert augment.crop_box(3, 90, rng) == (43, 0, 4, 3)  # Tall: height round(3 / (3/4)) = 4.


class _Base:
  name, img_size = 'base', 28

  def __init__(self, n):
    self.identity = {'set': 'base'}
    rng = np.random.default_rng(1)
    self.pictures = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)) for _ in range(n)]

  def __len__(self):
    return len(self.pictures)

  def raw(self, start, stop):
    return self.pictures[start:stop]

  def meta(self):
    return {'label': np.arange(len(self))}


def test_views_depend_on_seed_epoch_and_image_only():
  base = _Base(6)
  a, b = augment.AugmentedViews(base, 0, seed=3), augment.AugmentedViews(base, 1, seed=3)
  assert a.images(0, 6).shape == (6, 28, 28, 3)
  np.testing.assert_array_equal(a.images(2, 5), a.images(0, 6)[2:5])  # Not the batch.
  assert not np.array_equal(a.images(0, 6), b.images(0, 6))  # A new view each epoch.
  assert a.name == 'base_aug0' and a.identity['augment']['epoch'] == 0 and a.streamed
  np.testing.assert_array_equal(a.meta()['label'], np.arange(6))


def test_lazy_features_do_not_keep_streamed_sets(tmp_path):
  path = str(tmp_path / 'x.npz')
  features.save_npz(path, {'cls': np.ones((2, 4, 3)), 'images_per_s': 5.0, 'seconds': 1.0})
  feats = runner.LazyFeatures({'a': path, 'b': path}, streamed={'b'})
  assert feats['a'] is feats['a'] and feats['b'] is not feats['b']
  assert feats.timing('b') == (5.0, 1.0) and list(feats) == ['a', 'b']


@pytest.fixture(scope='module')
def augmented_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('aug')
  c = synthetic.get_config('tiny')
  c.backbones = 'random:vit_tiny14'
  c.probe.augment, c.probe.augment_epochs = True, 2
  return out, runner.run(c, str(out))


def test_augmented_probe_end_to_end(augmented_run):
  out, summary = augmented_run
  files = sorted(p.name for p in (out / 'features' / 'random-vit_tiny14').iterdir())
  assert any(f.startswith('synthetic_train_aug0-') for f in files)
  assert any(f.startswith('synthetic_train_aug1-') for f in files)
  assert not any(f.startswith('synthetic_train-') for f in files)  # Centre view not needed.
  r = summary['results']['random-vit_tiny14']['synthetic']
  p = r['protocol']['probe']
  assert p['augment'] and p['augment_epochs'] == 2 and p['mode'].startswith('augmented: 2')
  assert math.isfinite(r['metrics']['test_top1'])
  md = (out / 'results.md').read_text()
  assert 'synthetic top-1 |' in md and '(fast' not in md and 'RandomResizedCrop' in md
  with open(out / 'results.json') as f:
    assert json.load(f)['config']['probe']['augment'] is True
