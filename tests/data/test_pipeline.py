"""The grain pipeline on a tiny position-encoded dataset: shapes, same crop/flip for image and
depth, host sharding, workers, resume (also through orbax), misalignment and corrupt records."""

import datasets_for_tests as dft
import numpy as np
import pytest
from absl import flags

from triplane3d.data import pipeline, records, sources, transforms


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('posimg')
  dft.write(d, n=32)
  return d


# Jitted, XLA multiplies by the reciprocals of 255 and of the std instead of dividing: a few
# float32 roundings (ulp 2.4e-7 at the largest normalised value, 2.64) apart from numpy's.
_ROUNDINGS = 1e-6


def _take(it, n):
  return [next(it) for _ in range(n)]


def _create(c):
  return pipeline.create(c, pipeline.prepare(c), block=0, process_count=1)


def _indices(batch):
  return dft.index_of(batch['rgb'][..., 2].mean((1, 2)))


def test_shapes_ranges_and_same_crop_and_flip(data_dir):
  c = dft.config(data_dir)
  data = pipeline.prepare(c)
  assert data.num_examples == 32 and data.steps_per_epoch(c.train.batch_size) == 4
  flipped_err = []
  for b in _take(pipeline.create(c, data, block=0, process_count=1), 4):
    assert b['image'].shape == (8, 24, 24, 3) and b['image'].dtype == np.float32
    assert b['rgb'].shape == (8, 32, 32, 3) and b['rgb'].dtype == np.float32
    assert b['depth'].shape == (8, 32, 32, 1) and b['depth'].dtype == np.float32
    assert b['label'].shape == (8,) and b['label'].dtype == np.int32
    assert 0 <= b['rgb'].min() and b['rgb'].max() <= 1
    assert 1.5 <= b['depth'].min() and b['depth'].max() <= 2.5
    np.testing.assert_array_equal(b['label'], _indices(b) % 3)
    # Depth predicted from the image's own position code must match the depth target.
    u, v = b['rgb'][..., 0], b['rgb'][..., 1]
    err = np.abs(dft.depth_of(u, v) - b['depth'][..., 0])
    assert err.mean() < 0.005 and err.max() < 0.03, (err.mean(), err.max())
    flipped_err.append(np.abs(dft.depth_of(u[:, :, ::-1], v) - b['depth'][..., 0]).max())
    # The backbone input shows the same crop and flip as the target (checked on its u code).
    img = b['image'] * transforms.IMAGENET_STD + transforms.IMAGENET_MEAN
    np.testing.assert_allclose(img[..., 0].mean((1, 2)), u.mean((1, 2)), atol=0.01)
    np.testing.assert_array_equal(
      np.sign(img[:, :, -1, 0] - img[:, :, 0, 0]).mean(1), np.sign(u[:, :, -1] - u[:, :, 0]).mean(1)
    )
  # The check above can fail: a depth flipped relative to its image would be far off.
  assert max(flipped_err) > 0.1


def test_float_pixels_against_float64_for_every_pixel_value():
  """`transforms.float_pixels` on all 256 values in each channel, on numpy and jitted, against
  the conversion in float64 (ImageNet mean / std as stored, float32)."""
  import jax

  px = np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1).reshape(16, 16, 3)
  mean, std = (np.float64(a) for a in (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD))
  want = {'image': (px / 255.0 - mean) / std, 'rgb': px / 255.0}
  example = {'image': px, 'rgb': px, 'label': np.int32(3)}
  for got in (transforms.float_pixels(example), jax.jit(transforms.float_pixels)(example)):
    assert int(got['label']) == 3
    for k, w in want.items():
      assert got[k].dtype == np.float32 and got[k].shape == (16, 16, 3), k
      np.testing.assert_allclose(
        np.asarray(got[k], np.float64), w, rtol=0, atol=_ROUNDINGS, err_msg=k
      )
  np.testing.assert_array_equal(example['image'], px)  # The input is left as it was.


def test_uint8_pixels_are_the_same_examples_and_convert_to_the_float_layout(data_dir):
  """`float_pixels=False` (the trainer's wire format): the same crops and flips as uint8, which
  `transforms.float_pixels` turns into exactly the float batch on the host and into it within
  a few roundings jitted."""
  import jax

  c = dft.config(data_dir)
  data = pipeline.prepare(c)
  floats = _take(pipeline.create(c, data, block=0, process_count=1), 5)
  raws = _take(pipeline.create(c, data, block=0, process_count=1, float_pixels=False), 5)
  to_float = jax.jit(transforms.float_pixels)
  for f, r in zip(floats, raws, strict=True):
    assert r['image'].dtype == np.uint8 and r['image'].shape == (8, 24, 24, 3)
    assert r['rgb'].dtype == np.uint8 and r['rgb'].shape == (8, 32, 32, 3)
    host = transforms.float_pixels(r)
    for k in f:
      np.testing.assert_array_equal(host[k], f[k], err_msg=k)
    dev = to_float(r)
    for k in f:
      assert dev[k].dtype == f[k].dtype, k
      np.testing.assert_allclose(np.asarray(dev[k]), f[k], rtol=0, atol=_ROUNDINGS, err_msg=k)
    # The float batch is not the uint8 one cast: the conversion is there to check.
    assert np.abs(host['image'] - r['image']).max() > 1


def test_two_hosts_with_workers_disjoint_cover_and_resume(data_dir):
  flags.FLAGS.mark_as_parsed()
  c0, c1 = dft.config(data_dir, workers=2), dft.config(data_dir, workers=0)
  it0 = pipeline.create(c0, pipeline.prepare(c0), block=0, process_count=2)
  it1 = pipeline.create(c1, pipeline.prepare(c1), block=1, process_count=2)
  b0, b1 = _take(it0, 6), _take(it1, 4)  # 16 examples per host per epoch, 4 per batch.
  for b in b0[:1] + b1[:1]:
    assert b['image'].shape == (4, 24, 24, 3) and b['depth'].shape == (4, 32, 32, 1)
    assert b['rgb'].dtype == b['depth'].dtype == np.float32 and b['label'].dtype == np.int32
  seen0 = np.concatenate([_indices(b) for b in b0[:4]])
  seen1 = np.concatenate([_indices(b) for b in b1])
  assert not set(seen0) & set(seen1)
  assert sorted(np.concatenate([seen0, seen1])) == list(range(32))
  # Workers split the stream (worker k batches elements k, k + 2, ...), so batches differ from
  # a 0-worker run but an epoch holds the same examples; state is restored with equal workers.
  state = it0.get_state()
  next0 = _take(it0, 2)
  it = pipeline.create(c0, pipeline.prepare(c0), block=0, process_count=2)
  it.set_state(state)
  for want, got in zip(next0, _take(it, 2)):
    np.testing.assert_array_equal(_indices(want), _indices(got))
  it0.close(), it.close()  # Stop the worker processes now rather than at interpreter exit.


def test_resume_through_orbax_gives_same_next_batches(data_dir, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  c = dft.config(data_dir)
  it = _create(c)
  _take(it, 3)  # Mid-epoch (4 batches per epoch) ...
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.save(tmp_path / 'ckpt', args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
  want = _take(it, 3)  # ... and across the epoch boundary.
  it2 = _create(c)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    ckpt.restore(
      tmp_path / 'ckpt', args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(it2))
    )
  for w, g in zip(want, _take(it2, 3)):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def test_misaligned_depth_raises_named_error(tmp_path):
  dft.write(tmp_path, n=12, swap=(5, 6))
  src = sources.ImageDepthSource(str(tmp_path), dft.NAME, dft.DEPTH_NAME, 'train')
  with pytest.raises(sources.DepthMisalignedError) as e:
    src[5]
  msg = str(e.value)
  assert "'train'" in msg and 'index 5' in msg and 'img_005.png' in msg and 'img_006.png' in msg
  assert 'python -m triplane3d.data.precompute_depth --name=posimg' in msg
  src[4], src[7]  # Only the swapped pair is wrong.
  # Start-up reads a sample spread over the split (here all 12), so training does not start.
  with pytest.raises(sources.DepthMisalignedError, match='index 5'):
    _create(dft.config(tmp_path, batch_size=4))


def test_depth_kind_comes_from_the_dataset_unless_set(data_dir, tmp_path, caplog, monkeypatch):
  from triplane3d.data import depth_format

  monkeypatch.setattr(pipeline, '_WARNED', set())  # Warnings logged by earlier tests.

  c = dft.config(data_dir)
  c.depth.normalize = 'percentile'
  assert c.depth.is_disparity is None  # The default: follow the dataset.
  with caplog.at_level('WARNING'):
    assert not pipeline.depth_is_disparity(c)  # Records nothing: distance, with a warning.
  assert 'does not record whether it holds distance or disparity' in caplog.text
  other = tmp_path / 'copy'
  dft.write(other, n=4)
  info = {
    'model': 'm',
    'model_type': 'dpt',
    'output': 'disparity',
    'images': {'name': dft.NAME, 'split': 'train', 'num_records': 4},
    'records_per_shard': 2,
    'num_shards': 2,
    'max_side': 24,
  }
  depth_format.write_info(str(other), dft.DEPTH_NAME, 'train', info)
  c = dft.config(other)
  c.depth.normalize = 'percentile'
  assert pipeline.depth_is_disparity(c)
  assert pipeline.augmentation(c).depth_args['is_disparity']
  caplog.clear()
  c.depth.is_disparity = False  # An explicit value wins, with a warning.
  with caplog.at_level('WARNING'):
    assert not pipeline.depth_is_disparity(c)
  assert 'overrides' in caplog.text
  c.depth.is_disparity, c.depth.normalize = None, 'none'
  with pytest.raises(ValueError, match='disparity'):
    pipeline.augmentation(c)


def test_corrupt_record_is_skipped_and_counted(tmp_path, monkeypatch):
  dft.write(tmp_path, n=16, corrupt=(7,))
  c = dft.config(tmp_path, batch_size=4)
  # Prefetch threads may read the next epoch's copy of the bad record too (2 of ~19): this part
  # checks skipping and counting, not the budget, so give it room.
  c.data.max_bad_fraction = 0.5
  made = []  # The pipeline's transform (in-process: num_workers=0), which holds the counts.
  augmentation = pipeline.augmentation
  monkeypatch.setattr(pipeline, 'augmentation', lambda *a, **k: made.append(augmentation(*a, **k)) or made[-1])  # fmt: skip
  # 4 batches: the epoch's 15 good records, then one of the next epoch. Order is kept, so the
  # corrupt record has certainly been read (and counted) before the 16th element exists.
  seen = np.concatenate([_indices(b) for b in _take(_create(c), 4)])
  assert sorted(seen[:15]) == [i for i in range(16) if i != 7]
  assert c.data.num_workers == 0 and len(made) == 1
  assert made[0].skipped >= 1 and made[0].seen >= 16
  c.data.max_bad_fraction = 0.0  # A fresh pipeline counts from zero.
  with pytest.raises(transforms.TooManyCorruptImagesError, match='img_007'):
    _take(_create(c), 4)


def test_subset_is_fixed_and_sized(data_dir):
  c = dft.config(data_dir)
  c.data.subset_size = 8
  assert pipeline.prepare(c).num_examples == 8
  a = set(_indices(next(_create(c))))
  b = set(_indices(next(pipeline.create(c, pipeline.prepare(c), process_count=1, seed=5))))
  # One batch = the whole 8-example epoch: the same subset whatever the shuffling seed.
  assert a == b == set(sources.Subset(range(32), 8, c.seed).indices)


def test_depth_name_follows_the_image_dataset_unless_set():
  from triplane3d.configs import common

  c = common.get_base_config()
  c.data.name = 'my_photos'
  assert pipeline._names(c)[2] == 'my_photos_depth'  # What precompute_depth writes.
  c.data.depth_name = 'other_depth'
  assert pipeline._names(c)[2] == 'other_depth'


def test_nearly_flat_depth_maps_are_flat_and_real_ranges_stretch():
  rng = np.random.default_rng(0)
  noise = 3.0 + 6e-6 * rng.standard_normal((16, 16))  # A 2e-6 relative range: noise.
  flat = transforms.map_depth(noise, 1.5, 2.5, 'minmax')
  np.testing.assert_array_equal(flat, 2.0)  # Was stretched to std ~0.3 over [1.5, 2.5].
  ramp = np.linspace(3.0, 3.03, 256).reshape(16, 16)  # 1 % range: real structure.
  mapped = transforms.map_depth(ramp, 1.5, 2.5, 'minmax')
  np.testing.assert_allclose([mapped.min(), mapped.max()], [1.5, 2.5], atol=1e-5)


def test_missing_datasets_name_the_command_that_makes_them(tmp_path):
  # Instead of TFDS's DatasetNotFoundError and its catalogue of ~1,000 names.
  dft.write(tmp_path, n=4)
  c = dft.config(tmp_path, batch_size=2)
  c.data.depth_name = 'posimg_zoe'
  with pytest.raises(records.DatasetMissingError) as e:
    _create(c)
  msg = str(e.value)
  assert f"dataset 'posimg_zoe' not found in data_dir {tmp_path}" in msg
  assert 'python -m triplane3d.data.precompute_depth --name=posimg' in msg
  assert '--depth_name=posimg_zoe' in msg and 'Available datasets' not in msg
  c.data.name, c.data.depth_name = 'imagenet2012', ''
  with pytest.raises(records.DatasetMissingError, match=r'triplane3d\.data\.import_folder'):
    _create(c)


def test_an_empty_split_is_a_named_error(tmp_path):
  dft.write(tmp_path, n=0, num_shards=1)
  with pytest.raises(ValueError, match="split 'train' of 'posimg' has no records"):
    _create(dft.config(tmp_path, batch_size=2))
