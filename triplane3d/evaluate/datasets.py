"""Real evaluation datasets: looked up in a TFDS data_dir before any work, read as image sets.

`find(data_dir, name, splits)` returns the prepared TFDS builder or raises `DatasetMissingError`
naming the dataset, the directory searched and how to get it (`HOW_TO`). Datasets must be in
ArrayRecord format (random access without TensorFlow): prepared with
`tfds build NAME --file_format=array_record` or imported from an image folder with
`python -m triplane3d.data.import_folder`.

`TfdsImages` is a `features.ImageSet` over one split: DINOv2's evaluation preprocessing, the
shorter side resized to S·256/224 (bilinear) and the centre S×S crop, uint8 (B, S, S, 3). Its
`meta()` holds 'label' (N,) and 'file_name' (N,) when the dataset has them, and with
`depth_sub > 0` 'depth' (N, G·s, G·s): the depth map given the same resize and crop, then
averaged over blocks of 14/s pixels (G = S/14 patches per side).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from triplane3d.data import images as images_lib
from triplane3d.data.records import DatasetMissingError  # One error for every missing dataset.

_FOLDER = (
  'or import an image folder (one sub-folder per class) with python -m '
  'triplane3d.data.import_folder --src=DIR --name={name} --data_dir={data_dir} --split={split}'
)
HOW_TO = {
  'imagenet2012': 'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) in '
  'the TFDS manual dir and run tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record',
  'imagenet_r': 'run tfds build imagenet_r --data_dir={data_dir} --file_format=array_record',
  'imagenet_sketch': 'run tfds build imagenet_sketch --data_dir={data_dir} '
  '--file_format=array_record',
  'i_naturalist2021': 'run tfds build i_naturalist2021 --data_dir={data_dir} '
  '--file_format=array_record',
  'nyu_depth_v2': 'run tfds build nyu_depth_v2 --data_dir={data_dir} --file_format=array_record',
  'cue_conflict': 'clone https://github.com/rgeirhos/texture-vs-shape and run python -m '
  'triplane3d.data.import_folder --src=texture-vs-shape/stimuli/style-transfer-preprocessed-512 '
  '--name=cue_conflict --data_dir={data_dir}',
}


def _root(data_dir: str) -> str:
  return os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR


def _version_key(path: str):
  version = os.path.basename(os.path.dirname(path))
  return tuple(int(p) if p.isdigit() else -1 for p in version.split('.'))


def find(data_dir: str, name: str, splits) -> tfds.core.DatasetBuilder:
  """The prepared builder of `name` in `data_dir` (its newest version) with every split."""
  root = _root(data_dir)
  infos = glob.glob(os.path.join(root, name, '*', 'dataset_info.json'))
  infos += glob.glob(os.path.join(root, name, '*', '*', 'dataset_info.json'))  # With a config.
  split = next(iter(splits), 'train')
  how = HOW_TO.get(name, _FOLDER).format(data_dir=root, name=name, split=split)
  if not infos:
    raise DatasetMissingError(
      f'dataset {name!r} not found in data_dir {root} (no {name}/<version>/dataset_info.json); '
      f'to get it, {how} (or pass --config.data_dir=DIR where it is).'
    )
  directory = os.path.dirname(max(infos, key=_version_key))
  builder = tfds.builder_from_directory(directory)
  have = list(builder.info.splits)
  missing = [s for s in splits if s not in have]
  if missing:
    raise DatasetMissingError(
      f'dataset {name!r} in {directory} has splits {have}, not {missing}; prepare the missing '
      f"splits ({how}) or set the suite's split names in the config."
    )
  fmt = getattr(builder.info, 'file_format', None)  # A tfds FileFormat enum, or None.
  fmt = str(getattr(fmt, 'value', fmt or ''))
  if fmt and 'array_record' not in fmt.lower():
    raise DatasetMissingError(
      f'dataset {name!r} in {directory} is stored as {fmt}, which needs TensorFlow to read; '
      f'rebuild it as ArrayRecord: tfds build {name} --data_dir={root} '
      '--file_format=array_record.'
    )
  return builder


def find_all(data_dir: str, wanted) -> dict:
  """{name: builder} of [(name, splits)]; one DatasetMissingError naming every missing one."""
  found, problems = {}, []
  for name, splits in wanted:
    try:
      found[name] = find(data_dir, name, splits)
    except DatasetMissingError as e:
      problems.append(str(e))
  if problems:
    raise DatasetMissingError('\n  '.join(problems))
  return found


def _resize_crop(img: Image.Image, size: int, resample) -> Image.Image:
  """Shorter side to size·256/224, then the centre size×size crop (DINOv2's eval transform)."""
  w, h = img.size
  short = round(size * 256 / 224)
  scale = short / min(w, h)
  img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  return img.crop((left, top, left + size, top + size))


@dataclasses.dataclass
class TfdsImages:
  """One split as a `features.ImageSet` (module docstring). `limit` > 0 keeps `limit` records
  of a fixed random permutation of the split, from position `skip` on (read in record order)."""

  name: str  # The set's name in caches and reports.
  builder: tfds.core.DatasetBuilder
  split: str
  img_size: int
  limit: int = 0
  skip: int = 0
  depth_sub: int = 0
  _source: object = None

  def __post_init__(self):
    # One fixed permutation per split: slices [skip, skip + limit) of it are disjoint subsets.
    n = self.builder.info.splits[self.split].num_examples
    perm = np.random.default_rng(0).permutation(n)
    self.indices = np.sort(perm[self.skip : self.skip + self.limit if self.limit else n])

  @property
  def identity(self) -> dict:
    return {
      'dataset': self.builder.info.full_name,
      'directory': os.fspath(self.builder.data_dir),
      'split': self.split,
      'num_records': int(self.builder.info.splits[self.split].num_examples),
      'limit': self.limit,
      'skip': self.skip,
      'img_size': self.img_size,
      'preprocess': 'resize shorter side to S*256/224 (bilinear), centre crop S',
      'depth_sub': self.depth_sub,
    }

  def __len__(self) -> int:
    return len(self.indices)

  def _records(self, start: int, stop: int):
    if self._source is None:
      skip = {
        k: tfds.decode.SkipDecoding()
        for k, f in self.builder.info.features.items()
        if isinstance(f, tfds.features.Image)
      }
      self._source = self.builder.as_data_source(self.split, decoders=skip or None)
    return [self._source[int(i)] for i in self.indices[start:stop]]

  def images(self, start: int, stop: int) -> np.ndarray:
    out = []
    for r in self._records(start, stop):
      img = images_lib.open_rgb(r['image'])
      out.append(np.asarray(_resize_crop(img, self.img_size, Image.Resampling.BILINEAR)))
    return np.stack(out).astype(np.uint8)

  def _depth(self, depth_hw) -> np.ndarray:
    img = Image.fromarray(np.asarray(depth_hw, np.float32), mode='F')
    d = np.asarray(_resize_crop(img, self.img_size, Image.Resampling.NEAREST), np.float32)
    px, s = 14 // self.depth_sub, self.img_size
    return d.reshape(s // px, px, s // px, px).mean(axis=(1, 3))

  def meta(self) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for start in range(0, len(self), 256):
      for r in self._records(start, min(len(self), start + 256)):
        for k in ('label', 'file_name'):
          if k in r:
            v = r[k]
            out.setdefault(k, []).append(v.decode() if isinstance(v, bytes) else v)
        if self.depth_sub:
          out.setdefault('depth', []).append(self._depth(r['depth']))
    return {k: np.asarray(v) for k, v in out.items()}
