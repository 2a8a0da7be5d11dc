"""PUG:ImageNet and ImageNet-3DCC: scoring against hand-made heads (PUG's class mapping with its
Shirt/Sweatshirt quirk, restricted vs all logits; 3DCC's averages), then both read end to end
from tiny image folders imported with import_folder, and their missing-data errors."""

import io

import ml_collections as mlc
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from triplane3d.configs.eval import common
from triplane3d.data import import_folder, records
from triplane3d.evaluate import datasets, robustness, runner

WOLF, GOLDFISH, SWEATSHIRT, RAY = 270, 1, 841, 5  # RAY (electric ray) is no PUG class.


def _feats(x, labels):
  """Features whose 'cls1' variant is x (N, D)."""
  x = np.asarray(x, np.float32)
  return {'cls': np.repeat(x[:, None], 4, 1), 'patch_mean': x, 'meta_label': np.asarray(labels)}


def test_pug_mapping_is_pugs_table():
  m = robustness.load_pug_mapping()
  assert len(m) == 151 and sum(len(v) for v in m.values()) == 177
  assert m['Wolf'] == (269, 270, 271, 272) and m['Goldfish'] == (GOLDFISH,)
  assert m['Shirt'] == m['Sweatshirt'] == (SWEATSHIRT,)


def test_pug_scores_like_pugs_notebook():
  c = mlc.ConfigDict({'splits': ('texture',), 'mapping': '', 'restrict': True})
  pug = robustness.Pug(c)
  pug.names = {'texture': ['Goldfish', 'Shirt', 'Sweatshirt', 'Wolf']}  # Sorted class folders.
  w = np.zeros((4, 1000), np.float32)
  w[0, GOLDFISH] = w[1, SWEATSHIRT] = w[2, WOLF] = 1.0
  w[3, RAY], w[3, WOLF] = 10.0, 5.0  # Best overall: a non-PUG class; best mapped: Wolf.
  head = {'w': w, 'b': np.zeros(1000, np.float32)}
  feats = {'pug_texture': _feats(np.eye(4)[[0, 1, 1, 2, 3]], [0, 1, 2, 3, 3])}
  # Goldfish ✓, Shirt → 841 → Sweatshirt ✗ (the notebook's inversion), Sweatshirt ✓, Wolf ✓,
  # and the last Wolf: ✓ restricted to mapped logits, ✗ over all 1000 (RAY wins).
  assert pug.score(head, 'cls1', feats)[0] == {'pug_texture_top1': 4 / 5}
  c.restrict = False
  unrestricted = robustness.Pug(c)
  unrestricted.names = pug.names
  assert unrestricted.score(head, 'cls1', feats)[0] == {'pug_texture_top1': 3 / 5}


def test_3dcc_averages_severities_then_corruptions():
  c = mlc.ConfigDict({'corruptions': ('fog_3d', 'flash'), 'severities': (1, 2)})
  cc = robustness.ThreeDCC(c)
  cc.to_imagenet = {lvl: np.asarray([GOLDFISH, WOLF]) for lvl in ('fog_3d_1', 'fog_3d_2', 'flash_1', 'flash_2')}  # fmt: skip
  w = np.zeros((2, 1000), np.float32)
  w[0, GOLDFISH] = w[1, WOLF] = 1.0
  head = {'w': w, 'b': np.zeros(1000, np.float32)}
  right, wrong = np.eye(2)[[0, 1]], np.eye(2)[[1, 0]]
  feats = {
    '3dcc_fog_3d_1': _feats(right, [0, 1]),  # 1.0
    '3dcc_fog_3d_2': _feats(np.eye(2)[[0, 0]], [0, 1]),  # 0.5
    '3dcc_flash_1': _feats(wrong, [0, 1]),  # 0.0
    '3dcc_flash_2': _feats(wrong, [0, 1]),  # 0.0
  }
  m, d = cc.score(head, 'cls1', feats)
  assert m == {'3dcc_fog_3d_top1': 0.75, '3dcc_flash_top1': 0.0, '3dcc_top1': 0.375}
  assert d['per_level']['fog_3d_2'] == 0.5


# End to end: solid colours per ImageNet class, the same in every set, so a random ViT's
# features separate them and the probe's predictions are right on the shifted sets too.
COLOURS = {GOLDFISH: (200, 40, 40), WOLF: (40, 200, 40), SWEATSHIRT: (40, 40, 200)}


def _picture(rng, colour, h=30, w=40):
  return np.clip(np.asarray(colour) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _png(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


def _folder(root, classes, rng, n=2, size=(30, 40)):
  """root/<class>/<i>.png for {class folder name: ImageNet index (its colour)}."""
  for name, index in classes.items():
    (root / name).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(_picture(rng, COLOURS[index], *size)).save(root / name / f'{i}.png')
  return str(root)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  src = tmp_path_factory.mktemp('src')
  rng = np.random.default_rng(0)
  feats = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'label': tfds.features.ClassLabel(num_classes=1000),
    }
  )

  def labelled(n):
    return [{'image': _png(_picture(rng, COLOURS[y])), 'label': y} for y in list(COLOURS) * n]

  records.write_dataset(d, 'imagenet2012', feats, {'train': [labelled(8)], 'validation': [labelled(3)]})  # fmt: skip
  # PUG factors: 300×300 renders (PUG's centre 256 crop must fit), class folders by PUG name.
  pug = {'Goldfish': GOLDFISH, 'Sweatshirt': SWEATSHIRT, 'Wolf': WOLF}
  for split, folder in (('texture', 'Object_Texture'), ('size', 'Object_Scale')):
    _folder(src / 'PUG' / folder, pug, rng, size=(300, 300))
    import_folder.import_folder(str(src / 'PUG' / folder), 'pug_imagenet', d, split)
  # A 3DCC level whose class folders are PUG names, not wnids.
  import_folder.import_folder(str(src / 'PUG' / 'Object_Texture'), 'bad_3dcc', d, 'fog_3d_1')
  wnids = robustness.imagenet_wnids()
  for corruption in ('fog_3d', 'flash'):
    for severity in (1, 2):
      level = src / '3DCC' / corruption / str(severity)
      _folder(level, {wnids[i]: i for i in COLOURS}, rng)
      import_folder.import_folder(str(level), 'imagenet_3dcc', d, f'{corruption}_{severity}')
  return d


def _config(data_dir):
  c = common.get_base_config()
  c.suites, c.backbones, c.data_dir = 'imagenet', 'random:vit_tiny14', data_dir
  c.img_size, c.batch_size = 28, 16
  c.probe.epochs, c.probe.batch_size, c.probe.lrs = 40, 8, (1e-3, 1e-2, 0.1)
  c.imagenet.robustness = ()
  c.pug_imagenet.splits = ('texture', 'size')
  c.imagenet_3dcc.corruptions, c.imagenet_3dcc.severities = ('fog_3d', 'flash'), (1, 2)
  return c


def test_pug_and_3dcc_end_to_end(data_dir, tmp_path):
  summary = runner.run(_config(data_dir), str(tmp_path))
  r = summary['results']['random-vit_tiny14']['imagenet']
  m = r['metrics']
  assert m['top1'] >= 0.9
  assert m['pug_texture_top1'] >= 0.9 and m['pug_size_top1'] >= 0.9
  assert m['3dcc_top1'] == pytest.approx((m['3dcc_fog_3d_top1'] + m['3dcc_flash_top1']) / 2)
  assert m['3dcc_top1'] >= 0.9
  assert set(r['details']['threedcc']['per_level']) == {
    'fog_3d_1',
    'fog_3d_2',
    'flash_1',
    'flash_2',
  }
  assert r['protocol']['sets']['pug_texture']['preprocess'] == 'pug'
  md = (tmp_path / 'results.md').read_text()
  assert 'PUG-texture top-1' in md and 'ImageNet-3DCC top-1 (mean)' in md
  assert '| ImageNet-3DCC top-1 | fog_3d | flash |' in md


def test_missing_and_misnamed_folder_datasets(data_dir, tmp_path):
  c = _config(data_dir)
  c.pug_imagenet.dataset, c.imagenet_3dcc.corruptions = 'pug_missing', ('fog_3d', 'z_motion_blur')
  with pytest.raises(datasets.DatasetMissingError) as info:
    runner.Run(c, str(tmp_path / 'out'))
  text = str(info.value)
  assert "'pug_missing'" in text and 'Object_Texture' in text and 'import_folder' in text
  assert "'z_motion_blur_1'" in text  # The missing 3DCC levels, in the same message.
  c = _config(data_dir)
  c.imagenet_3dcc.dataset = 'bad_3dcc'  # Class folders that are not wnids.
  c.imagenet_3dcc.corruptions, c.imagenet_3dcc.severities = ('fog_3d',), (1,)
  with pytest.raises(datasets.DatasetMissingError, match='WordNet ids'):
    runner.Run(c, str(tmp_path / 'out'))
