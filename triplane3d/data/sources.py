"""Random-access sources: an image dataset joined record by record with its depth dataset.

Images come from any TFDS image dataset in ArrayRecord format (ImageNet is `imagenet2012`),
depth from the dataset `precompute_depth` writes for it (`depth_format`). Record `i` of one is
record `i` of the other; every read checks the stable per-image key so a misaligned pair stops
training with `DepthMisalignedError` instead of silently learning wrong depth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from triplane3d.data import records


class DepthMisalignedError(RuntimeError):
  """The depth record at an index does not belong to the image record at that index."""

  def __init__(self, split: str, index: int, image_key: str, depth_key: str):
    super().__init__(
      f'depth dataset is misaligned with the image dataset: split {split!r}, index {index}: '
      f'image key {image_key!r} != depth key {depth_key!r}. Recompute the depth dataset for '
      'this image dataset (python -m triplane3d.data.precompute_depth).'
    )
    self.split, self.index, self.image_key, self.depth_key = split, index, image_key, depth_key


def _text(v) -> str:
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)


def example_key(example: Mapping) -> str:
  """The stable key of an image record: its file name, else a hash of its encoded bytes."""
  if 'file_name' in example:
    return _text(example['file_name'])
  return 'sha1:' + hashlib.sha1(bytes(example['image'])).hexdigest()[:20]


class ImageDepthSource:
  """`len()` and `[i]` over (image record i, depth record i) of one split, key-checked.

  `[i]` returns {'image': encoded bytes, 'label': int, 'key': str, 'depth': PNG bytes,
  'depth_range': float32 (2,)}. Picklable (grain workers rebuild the TFDS sources lazily).
  """

  def __init__(self, data_dir: str, name: str, depth_name: str, split: str):
    self.data_dir, self.name, self.depth_name, self.split = data_dir, name, depth_name, split
    self._images = self._depth = None
    self._len = len(self._sources()[0])
    n_depth = len(self._depth)
    if n_depth != self._len:
      raise ValueError(
        f'split {split!r}: image dataset {name!r} has {self._len} records but depth dataset '
        f'{depth_name!r} has {n_depth}; they must be aligned record by record.'
      )

  def _sources(self):
    if self._images is None:
      self._images = records.open_split(self.data_dir, self.name, self.split)
      self._depth = records.open_split(self.data_dir, self.depth_name, self.split)
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
      raise DepthMisalignedError(self.split, int(index), key, depth_key)
    return {
      'image': bytes(image['image']),
      'label': int(image.get('label', -1)),
      'key': key,
      'depth': bytes(d['depth']),
      'depth_range': np.asarray(d['depth_range'], np.float32),
    }

  def check_alignment(self, indices: Sequence[int] | None = None) -> None:
    """Reads a few records (default: first and last) so misalignment fails at start-up."""
    for i in indices if indices is not None else sorted({0, self._len - 1}):
      self[i]


class Subset:
  """A fixed random subset of N records of a source (the paper's 100k / 500k ablation).

  The subset depends only on `seed`, so every host and every restart picks the same one.
  """

  def __init__(self, source, size: int, seed: int):
    if not 0 < size <= len(source):
      raise ValueError(f'subset size must be in [1, {len(source)}], got {size}.')
    self.source = source
    rng = np.random.default_rng([seed, 0x5B5E7])
    self.indices = np.sort(rng.choice(len(source), size=size, replace=False))

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]
