"""The real-data suites (imagenet + robustness sets, shape_bias, nyu_depth) on tiny stand-in
datasets written in the TFDS layout they are read from: lookup, decode + resize + centre crop,
the ImageNet head scored on class subsets and turned into cue-conflict decisions, the depth
probe on NYU-shaped records."""

import io
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from triplane3d.configs.eval import common
from triplane3d.data import records
from triplane3d.evaluate import runner, shape_bias

# Four ImageNet classes, each a solid colour: airplane, knife, oven (categories of the
# cue-conflict 16 with one ImageNet class each, so the mean aggregation cannot dilute them), cat.
AIRPLANE, KNIFE, OVEN, CAT = 404, 499, 766, 281
CLASSES = {AIRPLANE: (200, 40, 40), KNIFE: (40, 200, 40), OVEN: (40, 40, 200), CAT: (200, 200, 40)}


def _png(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _image(rng, color, h=30, w=44):
  """A non-square picture of one colour with a little noise (the probe must still see it)."""
  return np.clip(np.asarray(color) + rng.normal(0, 12, (h, w, 3)), 0, 255)


def _labelled(rng, labels, names=None):
  return [
    {'image': _png(_image(rng, CLASSES[y])), 'label': y, 'file_name': n or f'img_{i}.png'}
    for i, (y, n) in enumerate(zip(labels, names or [None] * len(labels)))
  ]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  rng = np.random.default_rng(0)
  feats = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'label': tfds.features.ClassLabel(num_classes=1000),
      'file_name': tfds.features.Text(),
    }
  )
  classes = list(CLASSES)
  records.write_dataset(
    d,
    'imagenet2012',
    feats,
    {
      'train': [_labelled(rng, classes * 8)],
      'validation': [_labelled(rng, classes * 3)],
    },
  )
  # ImageNet-R holds 200 of the 1000 classes: here two, so the head is restricted to them.
  records.write_dataset(d, 'imagenet_r', feats, {'test': [_labelled(rng, [AIRPLANE, KNIFE] * 3)]})
  records.write_dataset(d, 'imagenet_sketch', feats, {'test': [_labelled(rng, classes * 2)]})
  # Cue conflict: (colour, name): the colour is the cue the head reads, so the decision is the
  # colour's category; it matches the named texture 3 times, the named shape once.
  conflict = [(KNIFE, 'airplane1-knife1.png'), (OVEN, 'knife2-oven2.png'),
              (AIRPLANE, 'oven3-airplane3.png'), (KNIFE, 'knife4-airplane4.png'),
              (OVEN, 'oven5-oven5.png')]  # fmt: skip
  records.write_dataset(
    d, 'cue_conflict', feats, {'train': [_labelled(rng, *zip(*conflict))]}
  )  # fmt: skip
  depth_feats = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'depth': tfds.features.Tensor(shape=(30, 44), dtype=np.float16),
    }
  )

  def scene(i):  # Depth follows the brightness of each half: learnable from the features.
    left, right = rng.uniform(40, 220, 2)
    img = np.concatenate([np.full((30, 22, 3), left), np.full((30, 22, 3), right)], axis=1)
    depth = 1.0 + img[..., 0] / 64.0
    return {'image': _png(img), 'depth': depth.astype(np.float16)}

  records.write_dataset(
    d,
    'nyu_depth_v2',
    depth_feats,
    {'train': [[scene(i) for i in range(40)]], 'validation': [[scene(i) for i in range(12)]]},
  )
  return d


def test_imagenet_shape_bias_and_nyu(data_dir, tmp_path):
  c = common.get_base_config()
  c.suites = 'imagenet,shape_bias,nyu_depth'
  c.backbones = 'random:vit_tiny14'
  c.data_dir = data_dir
  c.img_size = 28
  c.batch_size = 16
  c.probe.epochs = 40
  c.probe.batch_size = 8
  c.probe.lrs = (1e-3, 1e-2, 0.1)
  c.nyu_depth.num_train, c.nyu_depth.num_test = 40, 12
  c.nyu_depth.eigen_crop = False  # Stand-in frames are 30×44, not NYU's 480×640.
  c.nyu_depth.steps, c.nyu_depth.warmup_steps, c.nyu_depth.batch_size = 300, 30, 8
  c.nyu_depth.lr, c.nyu_depth.max_depth = 3e-3, 5.0  # A short run: see test_depth_linear.
  summary = runner.run(c, str(tmp_path))
  r = summary['results']['random-vit_tiny14']
  assert r['imagenet']['metrics']['top1'] >= 0.9  # Colours are easy even for random features.
  assert r['imagenet']['metrics']['imagenet_r_top1'] >= 0.9  # Restricted to its 2 classes.
  assert r['imagenet']['metrics']['imagenet_sketch_top1'] >= 0.9
  bias = r['shape_bias']['details']['cue_conflict']
  assert (bias['num_images'], bias['num_excluded']) == (4, 1)  # oven5-oven5: no conflict.
  assert (bias['shape_hits'], bias['texture_hits'], bias['shape_bias']) == (1, 3, 0.25)
  per = bias['per_category']  # By shape: knife2-oven2 texture, knife4-airplane4 shape.
  assert (per['knife'], per['oven'], per['airplane']) == (0.5, 0.0, 0.0)
  assert set(bias['per_category']) == set(shape_bias.CATEGORIES)
  depth = r['nyu_depth']['details']['depth']
  assert depth['rmse'] < 0.9 * depth['baselines']['mean_depth']['rmse']
  assert r['nyu_depth']['metrics']['rmse'] == depth['rmse']
  assert depth['protocol']['test_flip'] and depth['protocol']['target_hw'] == [28, 28]
  for name in ('imagenet.png', 'shape_bias.png', 'shape_bias_per_category.png', 'nyu_depth.png'):
    assert (tmp_path / name).exists(), name
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['results'] == summary['results']
  md = (tmp_path / 'results.md').read_text()
  assert 'imagenet_r top-1' in md and 'cue-conflict shape bias' in md
  # Fast mode (the default): the probe's features are centre crops, and the reports say so.
  assert 'imagenet top-1 (fast: centre crops)' in md and '**fast: centre crops**' in md
  assert r['imagenet']['protocol']['probe']['mode'] == 'fast: centre crops'
