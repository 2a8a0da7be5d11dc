"""import_folder → precompute_depth (a tiny random Depth Anything) → the pipeline reads it.

Covers: an interrupted precompute resumes without redoing finished shards; the stored depth
equals the model run independently (transformers + a numpy bicubic resize); flags are checked
up front; a resume with another sharding is refused with advice that works; the model's output
kind is recorded and used by training; a re-import after photos are added, renamed, removed or
edited is detected by training, and the advice it prints brings the depth up to date.
"""

import io
import os
import re
import shlex
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from triplane3d.data import (
  depth_format,
  import_folder,
  pipeline,
  precompute_depth,
  records,
  sources,
)

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

MAX_SIDE = 24


def _tiny_depth_anything(path):
  """A randomly initialised, tiny relative Depth Anything (DINOv2 backbone) + processor.

  With the library's initialisation (std 0.02) the head's output is flat to 1e-7; PyTorch's
  default conv initialisation in the neck and head, and an output bias of 1, make a spatially
  varying, positive map (~1 ± 0.1), like a real model's relative disparity.
  """
  torch.manual_seed(0)
  backbone = transformers.Dinov2Config(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    out_features=['stage1', 'stage2'],
    reshape_hidden_states=False,
  )
  cfg = transformers.DepthAnythingConfig(
    backbone_config=backbone,
    patch_size=8,
    reassemble_hidden_size=32,
    reassemble_factors=[2, 1],
    neck_hidden_sizes=[16, 16],
    fusion_hidden_size=16,
    head_hidden_size=8,
  )
  model = transformers.DepthAnythingForDepthEstimation(cfg)
  with torch.no_grad():
    for m in [*model.neck.modules(), *model.head.modules()]:
      if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        m.reset_parameters()
    model.head.conv3.weight *= 10
    model.head.conv3.bias.fill_(1.0)
  model.save_pretrained(path)
  transformers.DPTImageProcessor(
    size={'height': 32, 'width': 32}, keep_aspect_ratio=True, ensure_multiple_of=8
  ).save_pretrained(path)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('depth_anything'))
  _tiny_depth_anything(path)
  return path


def _photo(rng, i):
  h, w = (40, 56) if i % 3 else (48, 36)  # Two aspect ratios: two model batches.
  return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _folder(root, n=10):
  rng = np.random.default_rng(0)
  for i in range(n):
    cls = ('cat', 'dog')[i % 2]
    os.makedirs(root / cls, exist_ok=True)
    _photo(rng, i).save(root / cls / f'{i}.jpg')
  (root / 'dog' / 'broken.jpg').write_bytes(b'not an image')


def _imported(tmp_path):
  _folder(tmp_path / 'src')
  data_dir = str(tmp_path / 'tfds')
  assert import_folder.import_folder(str(tmp_path / 'src'), 'pets', data_dir).written == 10
  return data_dir


def _read_all(data_dir):
  src = sources.ImageDepthSource(data_dir, 'pets', 'pets_depth', 'train')
  return [src[i] for i in range(len(src))]  # Key- and hash-checked against the images.


def test_import_precompute_resume_and_read(tmp_path, model_dir):
  data_dir = _imported(tmp_path)
  images = records.open_split(data_dir, 'pets', 'train')
  assert len(images) == 10  # The unreadable file is left out.
  assert images[0]['file_name'].decode() == os.path.join('cat', '0.jpg') and images[0]['label'] == 0

  kw = dict(records_per_shard=4, batch_size=3, max_side=MAX_SIDE)
  # "Interrupted" after one of three shards (3, 3, 4 images): no metadata yet, shard 0 on disk.
  assert (
    precompute_depth.precompute('pets', 'train', data_dir, model_dir, max_work_shards=1, **kw) == 3
  )
  assert not records.is_prepared(data_dir, 'pets_depth')
  first = records.shard_path(data_dir, 'pets_depth', 'train', 0, 3)
  stamp = os.stat(first).st_mtime_ns
  assert precompute_depth.precompute('pets', 'train', data_dir, model_dir, **kw) == 7
  assert os.stat(first).st_mtime_ns == stamp and records.is_prepared(data_dir, 'pets_depth')
  assert precompute_depth.precompute('pets', 'train', data_dir, model_dir, **kw) == 0

  info = depth_format.read_info(data_dir, 'pets_depth', 'train')
  assert info['model'] == model_dir and info['model_type'] == 'depth_anything'
  assert info['output'] == 'disparity'  # Relative Depth Anything: inverse depth.
  assert info['records_per_shard'] == 4 and info['num_shards'] == 3
  assert info['images'] == {
    'name': 'pets',
    'split': 'train',
    'num_records': 10,
    'fingerprint': depth_format.split_fingerprint(
      depth_format.shard_fingerprint(
        (sources.example_key(images[i]), depth_format.content_hash(images[i]['image']))
        for i in range(lo, hi)
      )
      for lo, hi in ((0, 3), (3, 6), (6, 10))
    ),
  }
  for rec in _read_all(data_dir):
    d = depth_format.decode(rec['depth'], rec['depth_range'])
    assert max(d.shape) == MAX_SIDE and np.isfinite(d).all() and (d > 0).all()
  from triplane3d.configs import common

  c = common.get_base_config()
  c.data.data_dir, c.data.name, c.data.depth_name = data_dir, 'pets', 'pets_depth'
  c.data.num_workers, c.model.img_size, c.render.resolution, c.train.batch_size = 0, 28, 16, 4
  assert c.depth.is_disparity is None and pipeline.depth_is_disparity(c)  # From the dataset.
  b = next(pipeline.create(c, pipeline.prepare(c), process_count=1))
  assert b['depth'].shape == (4, 16, 16, 1) and b['image'].shape == (4, 28, 28, 3)
  assert 1.5 <= b['depth'].min() and b['depth'].max() <= 2.5


def _bicubic_axis(a: np.ndarray, out: int, axis: int) -> np.ndarray:
  """1-D cubic convolution resize (Keys, A = -0.75; half-pixel centres; edge samples repeated;
  no antialiasing): the documented post-processing, written from its definition."""
  n, A = a.shape[axis], -0.75

  def near(x):  # |x| <= 1
    return ((A + 2) * x - (A + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

  rows = []
  for i in range(out):
    x = n / out * (i + 0.5) - 0.5
    f = int(np.floor(x))
    t = x - f
    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    taps = [np.take(a, min(max(f + k, 0), n - 1), axis=axis) for k in (-1, 0, 1, 2)]
    rows.append(sum(w * v for w, v in zip(weights, taps)))
  return np.stack(rows, axis=axis)


def test_stored_depth_equals_an_independent_run_of_the_model(tmp_path, model_dir):
  data_dir = _imported(tmp_path)
  precompute_depth.precompute('pets', 'train', data_dir, model_dir, max_side=MAX_SIDE)
  processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
  model = transformers.AutoModelForDepthEstimation.from_pretrained(model_dir).eval()
  images = records.open_split(data_dir, 'pets', 'train')
  depth = records.open_split(data_dir, 'pets_depth', 'train')
  for i in range(len(images)):
    im = Image.open(io.BytesIO(images[i]['image'])).convert('RGB')  # Plain 8-bit RGB JPEGs.
    with torch.no_grad():
      raw = model(**processor(images=im, return_tensors='pt')).predicted_depth[0]
    raw = raw.double().numpy()
    s = min(1.0, MAX_SIDE / max(im.height, im.width))  # Aspect kept, longer side MAX_SIDE.
    h, w = round(im.height * s), round(im.width * s)
    want = _bicubic_axis(_bicubic_axis(raw, h, 0), w, 1)
    got = depth_format.decode(depth[i]['depth'], depth[i]['depth_range'])
    assert got.shape == (h, w)
    assert want.std() > 0.02 * abs(want.mean()), 'the tiny model must give varying depth'
    bound = depth_format.max_quantisation_error(depth[i]['depth_range']) + 1e-5
    np.testing.assert_array_less(np.abs(got - want), bound)


@pytest.mark.parametrize(
  'flag, value, allowed',
  [
    ('batch_size', -1, '>= 1'),
    ('batch_size', 0, '>= 1'),
    ('records_per_shard', 0, '>= 1'),
    ('num_shards', 0, '>= 1'),
    ('shard_index', 2, 'in [0, 1]'),
    ('shard_index', -1, 'in [0, 1]'),
    ('max_side', 0, '>= 1'),
  ],
)
def test_flags_are_checked_before_any_work(tmp_path, flag, value, allowed):
  data_dir = str(tmp_path / 'tfds')
  kw = {'num_shards': 2} if flag == 'shard_index' else {}
  kw[flag] = value
  with pytest.raises(precompute_depth.SettingsError) as e:
    precompute_depth.precompute('pets', 'train', data_dir, 'unused-model', **kw)
  assert f'--{flag}={value}' in str(e.value) and allowed in str(e.value)
  assert not os.path.exists(data_dir)  # Nothing read, nothing written.


def test_another_sharding_is_refused_and_both_fixes_work(tmp_path, model_dir):
  data_dir = _imported(tmp_path)
  kw = dict(batch_size=4, max_side=MAX_SIDE)
  precompute_depth.precompute(
    'pets', 'train', data_dir, model_dir, records_per_shard=4, max_work_shards=1, **kw
  )
  with pytest.raises(precompute_depth.SettingsError) as e:
    precompute_depth.precompute('pets', 'train', data_dir, model_dir, records_per_shard=5, **kw)
  msg = str(e.value)
  assert '--records_per_shard=4' in msg and '--overwrite' in msg
  # Fix 1: resume with the stored value.
  assert (
    precompute_depth.precompute('pets', 'train', data_dir, model_dir, records_per_shard=4, **kw)
    == 7
  )
  assert len(_read_all(data_dir)) == 10
  # Fix 2: recompute with the new value; the old shard files go, the split stays readable.
  assert (
    precompute_depth.precompute(
      'pets', 'train', data_dir, model_dir, records_per_shard=5, overwrite=True, **kw
    )
    == 10
  )
  d = records.dataset_dir(data_dir, 'pets_depth')
  assert not [f for f in os.listdir(d) if '-of-00003' in f]
  assert depth_format.read_info(data_dir, 'pets_depth', 'train')['records_per_shard'] == 5
  assert len(_read_all(data_dir)) == 10


def test_model_output_kind_is_known_or_must_be_given(tmp_path, model_dir):
  kind = precompute_depth.model_output
  assert kind(transformers.ZoeDepthConfig()) == 'distance'
  assert kind(transformers.DPTConfig()) == 'disparity'
  assert kind(transformers.DepthAnythingConfig()) == 'disparity'
  assert kind(transformers.DepthAnythingConfig(depth_estimation_type='metric')) == 'distance'
  assert kind(types.SimpleNamespace(model_type='something_new')) is None
  data_dir = _imported(tmp_path)
  unknown = types.SimpleNamespace(model_type='something_new')
  loaded = precompute_depth.DepthModel(model_dir)
  loaded.config = unknown
  with pytest.raises(precompute_depth.SettingsError, match='--depth_output=distance'):
    precompute_depth.precompute('pets', 'train', data_dir, loaded, max_side=MAX_SIDE)
  precompute_depth.precompute(
    'pets', 'train', data_dir, loaded, max_side=MAX_SIDE, depth_output='distance'
  )
  assert depth_format.read_info(data_dir, 'pets_depth', 'train')['output'] == 'distance'


def _run_advice(message: str) -> str:
  """Runs the precompute command a DepthMisalignedError prints, as a user would."""
  cmd = re.search(r'^\s*(python -m triplane3d\.data\.precompute_depth .*)$', message, re.M)
  assert cmd, message
  argv = shlex.split(cmd.group(1))
  assert argv[:3] == ['python', '-m', 'triplane3d.data.precompute_depth']
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_reimport_after_photos_change_is_caught_and_the_advice_fixes_it(tmp_path, model_dir):
  data_dir = _imported(tmp_path)
  kw = dict(records_per_shard=4, batch_size=4, max_side=MAX_SIDE)
  assert precompute_depth.precompute('pets', 'train', data_dir, model_dir, **kw) == 10
  old = {r['key']: r for r in _read_all(data_dir)}

  # Photos added, renamed and removed; one edited in place (same name, new pixels).
  src, rng = tmp_path / 'src', np.random.default_rng(1)
  _photo(rng, 0).save(src / 'cat' / '10.jpg')
  os.rename(src / 'dog' / '3.jpg', src / 'dog' / '3b.jpg')
  os.remove(src / 'cat' / '4.jpg')
  _photo(rng, 1).save(src / 'dog' / '7.jpg')
  import_folder.import_folder(str(src), 'pets', data_dir)
  with pytest.raises(sources.DepthMisalignedError) as e:
    sources.ImageDepthSource(data_dir, 'pets', 'pets_depth', 'train').check_alignment()
  kept = records.shard_path(data_dir, 'pets_depth', 'train', 1, 3)
  stamp = os.stat(kept).st_mtime_ns
  # Records 3..5 (cat/6, cat/8, dog/1) are unchanged: their shard is kept, the others redone.
  assert 'depth computed for 7 images' in _run_advice(str(e.value))
  assert os.stat(kept).st_mtime_ns == stamp

  new = {r['key']: r for r in _read_all(data_dir)}
  assert 'cat/10.jpg' in new and 'dog/3b.jpg' in new and 'cat/4.jpg' not in new

  def depth(r):
    return depth_format.decode(r['depth'], r['depth_range'])

  # Same photo, same depth (recomputed in another batch: equal to float rounding) ...
  np.testing.assert_allclose(depth(new['cat/0.jpg']), depth(old['cat/0.jpg']), atol=1e-3)
  # ... while the edited photo's depth is new.
  assert np.abs(depth(new['dog/7.jpg']) - depth(old['dog/7.jpg'])).max() > 0.01
  assert precompute_depth.precompute('pets', 'train', data_dir, model_dir, **kw) == 0


def test_photo_edited_in_place_is_caught_at_read_and_only_its_shard_recomputed(tmp_path, model_dir):
  data_dir = _imported(tmp_path)
  kw = dict(records_per_shard=4, batch_size=4, max_side=MAX_SIDE)
  precompute_depth.precompute('pets', 'train', data_dir, model_dir, **kw)
  _photo(np.random.default_rng(2), 2).save(tmp_path / 'src' / 'dog' / '9.jpg')  # Record 9.
  import_folder.import_folder(str(tmp_path / 'src'), 'pets', data_dir)
  src = sources.ImageDepthSource(data_dir, 'pets', 'pets_depth', 'train')
  src[8]  # Its neighbours are fine ...
  with pytest.raises(sources.DepthMisalignedError, match=r'dog/9\.jpg.*edited'):
    src[9]  # ... the edited photo is not, though its key is unchanged.
  # Only the last shard (records 6..9) is recomputed; then everything reads.
  assert precompute_depth.precompute('pets', 'train', data_dir, model_dir, **kw) == 4
  assert len(_read_all(data_dir)) == 10


def test_clipping_most_targets_warns_once_with_the_fraction(tmp_path, model_dir, caplog):
  from triplane3d.configs import common

  data_dir = _imported(tmp_path)
  precompute_depth.precompute('pets', 'train', data_dir, model_dir, max_side=MAX_SIDE)
  c = common.get_base_config()
  c.data.data_dir, c.data.name, c.data.depth_name = data_dir, 'pets', 'pets_depth'
  c.data.num_workers, c.model.img_size, c.render.resolution, c.train.batch_size = 0, 28, 16, 4
  # The demo's rule on model output (~1 ± 0.1, all below near = 1.5): every pixel clips.
  c.depth.normalize, c.depth.is_disparity = 'none', False
  with caplog.at_level('WARNING'):
    it = pipeline.create(c, pipeline.prepare(c), process_count=1)
    for _ in range(3):
      next(it)
  clipped = [r.getMessage() for r in caplog.records if 'clipped to camera.near' in r.getMessage()]
  assert len(clipped) == 1 and clipped[0].startswith('100%'), clipped
  assert 'is_disparity=False overrides' in caplog.text  # The dataset says disparity.
  caplog.clear()
  c.depth.normalize, c.depth.is_disparity = 'percentile', None  # The paper's rule: ~4 %.
  with caplog.at_level('WARNING'):
    it = pipeline.create(c, pipeline.prepare(c), process_count=1)
    for _ in range(3):
      next(it)
  assert 'clipped to camera.near' not in caplog.text
  c.depth.normalize = 'none'  # Disparity cannot be metric.
  with pytest.raises(ValueError, match=r"depth\.normalize='none' needs metric distance"):
    pipeline.augmentation(c)
