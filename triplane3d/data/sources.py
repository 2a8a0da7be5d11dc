"""Random-access sources: an image dataset joined record by record with its depth dataset.

Images come from any TFDS image dataset in ArrayRecord format (ImageNet is `imagenet2012`),
depth from the dataset `precompute_depth` writes for it (`depth_format`). Record `i` of one is
record `i` of the other. Depth goes stale when the images change after it was computed (a
re-import of a folder whose photos were added, removed, renamed or edited), so:

- at open, the record counts and the depth dataset's `depth_info` (image dataset name, record
  count) must agree, and `check_alignment` reads a sample of records spread over the split;
- every read checks the image's stable key and, where the depth record holds one, the content
  hash of the image's bytes (a photo edited in place keeps its key).

Any mismatch raises `DepthMisalignedError` with the precompute command that brings the depth up
to date (it recomputes the shards whose images changed). Comparing the split fingerprint at
open would mean hashing every image at every start; the per-read check covers each record
actually used, for the cost of one sha1 of bytes already in memory.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Mapping, Sequence

import numpy as np

from triplane3d.data import depth_format, records


class DepthMisalignedError(RuntimeError):
  """The depth dataset does not belong to the image dataset as it is now (see the message)."""

  def __init__(self, message: str, split: str, index: int | None = None):
    super().__init__(message)
    self.split, self.index = split, index


def _text(v) -> str:
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)


def example_key(example: Mapping) -> str:
  """The stable key of an image record: its file name, else a hash of its encoded bytes."""
  if 'file_name' in example:
    return _text(example['file_name'])
  return 'sha1:' + hashlib.sha1(bytes(example['image'])).hexdigest()[:20]


def update_command(data_dir: str, name: str, depth_name: str, split: str, info) -> str:
  """The precompute_depth command that brings `depth_name`/`split` up to date with the images.

  With the stored `depth_info`, it repeats the stored model, output kind, sharding and size (so
  it is never refused, and recomputed maps match the kept ones); without one (an older depth dataset), MODEL stands for the model used.
  """
  args = [f'--name={name}', f'--split={split}', f'--data_dir={data_dir}']
  args.append(f'--depth_name={depth_name}')
  if info:
    args += [
      f'--model={info["model"]}',
      f'--depth_output={info["output"]}',
      f'--records_per_shard={info["records_per_shard"]}',
      f'--max_side={info["max_side"]}',
    ]
  else:
    args.append('--model=MODEL')
  return 'python -m triplane3d.data.precompute_depth ' + ' '.join(shlex.quote(a) for a in args)


class ImageDepthSource:
  """`len()` and `[i]` over (image record i, depth record i) of one split, checked.

  `[i]` returns {'image': encoded bytes, 'label': int, 'key': str, 'depth': PNG bytes,
  'depth_range': float32 (2,)}. `.info` is the depth dataset's `depth_info` (None when it has
  none). Picklable (grain workers rebuild the TFDS sources lazily).
  """

  def __init__(self, data_dir: str, name: str, depth_name: str, split: str):
    self.data_dir, self.name, self.depth_name, self.split = data_dir, name, depth_name, split
    self._images = self._depth = None
    self.info = depth_format.read_info(data_dir, depth_name, split)
    self._len = len(self._sources()[0])
    n_depth = len(self._depth)
    made_for = (self.info or {}).get('images', {})
    if made_for.get('name', name) != name:
      self._fail(
        f'depth dataset {depth_name!r} was computed for image dataset '
        f'{made_for["name"]!r}, not {name!r}'
      )
    if n_depth != self._len or made_for.get('num_records', self._len) != self._len:
      self._fail(
        f'image dataset {name!r} has {self._len} records but depth dataset {depth_name!r} has '
        f'{n_depth} (computed for {made_for.get("num_records", n_depth)})'
      )

  def _fail(self, what: str, index: int | None = None):
    fix = update_command(self.data_dir, self.name, self.depth_name, self.split, self.info)
    raise DepthMisalignedError(
      f'depth dataset is out of date or misaligned with the image dataset: split '
      f'{self.split!r}: {what}. The images probably changed after their depth was computed '
      f'(e.g. a re-import). Bring the depth up to date with\n  {fix}\n(it recomputes the '
      'shards whose images changed; add --shard_index/--num_shards to split it across '
      'machines as before).',
      self.split,
      index,
    )

  def _sources(self):
    if self._images is None:
      self._images = records.open_split(
        self.data_dir,
        self.name,
        self.split,
        make='Import a folder of images with `python -m triplane3d.data.import_folder`, build '
        f'it with `tfds build {self.name} --file_format=array_record`, or fix data.name / '
        'data.data_dir.',
      )
      cmd = update_command(self.data_dir, self.name, self.depth_name, self.split, None)
      self._depth = records.open_split(
        self.data_dir,
        self.depth_name,
        self.split,
        make=f'Make it with\n  {cmd}\n(MODEL: a depth model, e.g. Intel/zoedepth-nyu-kitti), '
        'or set data.depth_name to the one you made.',
      )
    return self._images, self._depth

  def __getstate__(self):
    # TFDS sources hold open file handles; reopen them in each worker.
    return {**self.__dict__, '_images': None, '_depth': None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    images, depth = self._sources()
    image, d = images[index], depth[index]
    key, depth_key = example_key(image), _text(d['key'])
    if key != depth_key:
      self._fail(f'index {index}: image key {key!r} != depth key {depth_key!r}', int(index))
    stored_hash = _text(d.get('image_hash', b''))
    if stored_hash and stored_hash != depth_format.content_hash(image['image']):
      self._fail(
        f'index {index}: image {key!r} was edited (its bytes are not the ones its depth was '
        'computed from)',
        int(index),
      )
    return {
      'image': bytes(image['image']),
      'label': int(image.get('label', -1)),
      'key': key,
      'depth': bytes(d['depth']),
      'depth_range': np.asarray(d['depth_range'], np.float32),
    }

  def check_alignment(self, indices: Sequence[int] | None = None, sample: int = 32) -> None:
    """Reads records so that stale depth fails at start-up: `indices`, or by default `sample`
    evenly spaced ones from the first to the last (a re-import that added, removed or renamed
    photos shifts every later record, so a spread sample catches it)."""
    if indices is None:
      indices = np.unique(np.linspace(0, self._len - 1, min(sample, self._len)).round())
    for i in indices:
      self[int(i)]


class Subset:
  """A fixed random subset of N records of a source (the paper's 100k / 500k ablation).

  The subset depends only on `seed`, so every host and every restart picks the same one.
  """

  def __init__(self, source, size: int, seed: int):
    if not 0 < size <= len(source):
      raise ValueError(
        f'data.subset_size must be in [1, {len(source)}] (the dataset size), got {size}.'
      )
    self.source = source
    rng = np.random.default_rng([seed, 0x5B5E7])
    self.indices = np.sort(rng.choice(len(source), size=size, replace=False))

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]
