"""import_folder → precompute_depth (tiny random ZoeDepth) → the pipeline reads the result;
an interrupted precompute resumes without redoing finished shards."""

import os

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


def _tiny_zoedepth(path):
  """A randomly initialised, tiny ZoeDepth (BEiT backbone) + processor saved to `path`."""
  torch.manual_seed(0)
  backbone = transformers.BeitConfig(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=64,
    out_indices=[1, 2, 3, 4],
    use_relative_position_bias=True,
    reshape_hidden_states=False,
    out_features=['stage1', 'stage2', 'stage3', 'stage4'],
  )
  cfg = transformers.ZoeDepthConfig(
    backbone_config=backbone,
    neck_hidden_sizes=[16, 16, 16, 16],
    fusion_hidden_size=16,
    reassemble_factors=[4, 2, 1, 0.5],
    num_relative_features=8,
    bin_embedding_dim=16,
    bin_configurations=[{'n_bins': 8, 'min_depth': 1e-3, 'max_depth': 10.0, 'name': 'nyu'}],
    num_attractors=[4, 4, 2, 1],
    patch_transformer_hidden_size=16,
    patch_transformer_intermediate_size=16,
    patch_transformer_num_attention_heads=2,
    backbone_hidden_size=32,
    hidden_size=32,
    bottleneck_features=16,
  )
  transformers.ZoeDepthForDepthEstimation(cfg).save_pretrained(path)
  transformers.ZoeDepthImageProcessor(
    size={'height': 32, 'width': 32}, keep_aspect_ratio=True, ensure_multiple_of=8
  ).save_pretrained(path)


def _folder(root):
  rng = np.random.default_rng(0)
  for i in range(10):
    cls = ('cat', 'dog')[i % 2]
    os.makedirs(root / cls, exist_ok=True)
    h, w = (40, 56) if i % 3 else (48, 36)  # Two aspect ratios: two model batches.
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / cls / f'{i}.jpg')
  (root / 'dog' / 'broken.jpg').write_bytes(b'not an image')


def test_import_precompute_resume_and_read(tmp_path):
  _folder(tmp_path / 'src')
  data_dir = str(tmp_path / 'tfds')
  assert import_folder.import_folder(str(tmp_path / 'src'), 'pets', data_dir) == 11
  images = records.open_split(data_dir, 'pets', 'train')
  assert len(images) == 10  # The unreadable file is left out.
  assert images[0]['file_name'].decode() == os.path.join('cat', '0.jpg') and images[0]['label'] == 0

  model_dir = str(tmp_path / 'zoe')
  _tiny_zoedepth(model_dir)
  kw = dict(records_per_shard=4, batch_size=3, max_side=24)
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

  src = sources.ImageDepthSource(data_dir, 'pets', 'pets_depth', 'train')
  for i in range(len(src)):
    rec = src[i]  # Key-checked against the image record.
    d = depth_format.decode(rec['depth'], rec['depth_range'])
    assert max(d.shape) == 24 and np.isfinite(d).all() and (d > 0).all()
  from triplane3d.configs import common

  c = common.get_base_config()
  c.data.data_dir, c.data.name, c.data.depth_name = data_dir, 'pets', 'pets_depth'
  c.data.num_workers, c.model.img_size, c.render.resolution, c.train.batch_size = 0, 28, 16, 4
  b = next(pipeline.create(c, process_count=1))
  assert b['depth'].shape == (4, 16, 16, 1) and b['image'].shape == (4, 28, 28, 3)
  assert 1.5 <= b['depth'].min() and b['depth'].max() <= 2.5
