"""Real evaluation datasets: looked up in a TFDS data_dir before any work, read as image sets.

`find(data_dir, name, splits)` returns the prepared TFDS builder or raises `DatasetMissingError`
naming the dataset, the directory searched and how to get it (`HOW_TO`). Datasets must be in
ArrayRecord format (random access without TensorFlow): prepared with
`tfds build NAME --file_format=array_record` or imported from an image folder with
`python -m triplane3d.data.import_folder`.

`TfdsImages` is a `features.ImageSet` over one split, uint8 (B, S, S, 3), preprocessed by
`prepare_image` (PREPROCESS): 'dinov2' (the default: DINOv2's evaluation transform, the shorter
side resized to S·256/224, bilinear, then the centre S×S crop), 'pug' (PUG:ImageNet's own
evaluation transform: the centre 256×256 pixels, then resized to S×S) or 'resize' (the whole
image to S×S, for images stored pre-cropped). Its `meta()` holds 'label' (N,) and 'file_name'
(N,) when the dataset has them, and with `depth_sub > 0` 'depth' (N, G·s, G·s): the depth map
given the same resize and crop (`prepare_depth`), then averaged over blocks of 14/s pixels
(G = S/14 patches per side), missing depth (0) left out of the averages. `Mirrored(set)` is the
same set flipped left-right (DINOv2's test-time flip for depth).
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
  'nyu_depth_v2': 'run tfds build nyu_depth_v2 --data_dir={data_dir} --file_format=array_record, '
  "or read DINOv2's own folder layout with --config.nyu_depth.folder=DIR (docs/evaluation.md)",
  'pug_imagenet': 'download PUG:ImageNet (https://github.com/facebookresearch/PUG) and run, per '
  'factor, python -m triplane3d.data.import_folder --src=PUG_ImageNet/Object_Texture '
  '--name=pug_imagenet --split=texture --data_dir={data_dir} (Object_Scale: --split=size)',
  'imagenet_3dcc': 'download ImageNet-3DCC (tools/download_imagenet_3dcc.sh of '
  'https://github.com/EPFL-VILAB/3DCommonCorruptions) and run, per corruption C and severity S, '
  'python -m triplane3d.data.import_folder --src=ImageNet-3DCC/C/S --name=imagenet_3dcc '
  '--split=C_S --data_dir={data_dir}',
  'cue_conflict': 'clone https://github.com/rgeirhos/texture-vs-shape and run python -m '
  'triplane3d.data.import_folder --src=texture-vs-shape/stimuli/style-transfer-preprocessed-512 '
  '--name=cue_conflict --data_dir={data_dir}',
}


def _root(data_dir: str) -> str:
  return os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR


def _version_key(path: str):
  version = os.path.basename(os.path.dirname(path))
  return tuple(int(p) if p.isdigit() else -1 for p in version.split('.'))


def find(data_dir: str, name: str, splits, how_to: str = '') -> tfds.core.DatasetBuilder:
  """The prepared builder of `name` in `data_dir` (its newest version) with every split.
  `how_to`: the HOW_TO key whose advice the errors give (default: `name`'s)."""
  root = _root(data_dir)
  infos = glob.glob(os.path.join(root, name, '*', 'dataset_info.json'))
  infos += glob.glob(os.path.join(root, name, '*', '*', 'dataset_info.json'))  # With a config.
  split = next(iter(splits), 'train')
  how = HOW_TO.get(how_to or name, _FOLDER).format(data_dir=root, name=name, split=split)
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


PREPROCESS = ('dinov2', 'pug', 'resize')
PUG_CROP = 256  # PUG:ImageNet's notebook: CenterCrop(256), then Resize((224, 224)).
# Eigen's evaluation crop of NYU's 480×640 frames (rows 45:471, columns 41:601): the border
# outside it holds no valid depth (the toolbox DINOv2 uses masks it in every evaluation).
EIGEN_CROP = ((45, 471), (41, 601))


def _center_crop(img: Image.Image, size: int) -> Image.Image:
  w, h = img.size
  left, top = (w - size) // 2, (h - size) // 2
  return img.crop((left, top, left + size, top + size))


def _resize_crop(img: Image.Image, size: int, resample) -> Image.Image:
  """Shorter side to size·256/224, then the centre size×size crop (DINOv2's eval transform)."""
  w, h = img.size
  short = round(size * 256 / 224)
  scale = short / min(w, h)
  img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
  return _center_crop(img, size)


def prepare_image(img: Image.Image, size: int, preprocess: str = 'dinov2', resample=None):
  """One image (or depth map, with resample=NEAREST) preprocessed to size×size (PREPROCESS)."""
  resample = Image.Resampling.BILINEAR if resample is None else resample
  if preprocess == 'dinov2':
    return _resize_crop(img, size, resample)
  if preprocess == 'pug':
    return _center_crop(img, PUG_CROP).resize((size, size), resample)
  if preprocess == 'resize':
    return img.resize((size, size), resample)
  raise ValueError(f'unknown preprocess {preprocess!r}: use one of {PREPROCESS}.')


def prepare_depth(depth_hw, size: int, depth_sub: int, eigen_crop: bool = False) -> np.ndarray:
  """A depth map (H, W) in metres (0: missing) → (G·s, G·s): resized and cropped as the image
  ('dinov2'; nearest), then each block of 14/s pixels averaged over its valid pixels."""
  d = np.asarray(depth_hw, np.float32)
  if eigen_crop:
    if d.shape != (480, 640):
      raise ValueError(
        f'eigen_crop needs NYU depth maps of 480×640, got {d.shape}: set '
        'nyu_depth.eigen_crop=False for other data.'
      )
    (top, bottom), (left, right) = EIGEN_CROP
    inside = np.zeros(d.shape, bool)
    inside[top:bottom, left:right] = True
    d = np.where(inside, d, 0.0)
  img = Image.fromarray(d, mode='F')
  d = np.asarray(prepare_image(img, size, resample=Image.Resampling.NEAREST), np.float32)
  px = 14 // depth_sub
  blocks = d.reshape(size // px, px, size // px, px)
  count = (blocks > 0).sum(axis=(1, 3))
  return np.where(count > 0, blocks.sum(axis=(1, 3)) / np.maximum(count, 1), 0.0).astype(np.float32)


def subset(n: int, limit: int, skip: int = 0) -> np.ndarray:
  """Sorted indices [skip, skip + limit) of one fixed permutation of range(n) (all: limit 0):
  disjoint slices give disjoint subsets, each read in record order."""
  perm = np.random.default_rng(0).permutation(n)
  return np.sort(perm[skip : skip + limit if limit else n])


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
  preprocess: str = 'dinov2'
  eigen_crop: bool = False
  _source: object = None

  def __post_init__(self):
    if self.preprocess not in PREPROCESS:
      raise ValueError(f'{self.name}: unknown preprocess {self.preprocess!r}: use {PREPROCESS}.')
    if self.depth_sub and self.preprocess != 'dinov2':
      raise ValueError(f'{self.name}: depth maps are cropped as preprocess="dinov2" only.')
    n = self.builder.info.splits[self.split].num_examples
    self.indices = subset(n, self.limit, self.skip)

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
      'preprocess': self.preprocess,
      'depth_sub': self.depth_sub,
      'eigen_crop': self.eigen_crop,
    }

  def __len__(self) -> int:
    return len(self.indices)

  def label_names(self) -> list[str] | None:
    """The names of the 'label' feature's classes (import_folder: the class folders)."""
    feats = self.builder.info.features
    names = getattr(feats['label'], 'names', None) if 'label' in feats else None
    return list(names) if names else None

  def _records(self, start: int, stop: int):
    if self._source is None:
      skip = {
        k: tfds.decode.SkipDecoding()
        for k, f in self.builder.info.features.items()
        if isinstance(f, tfds.features.Image)
      }
      self._source = self.builder.as_data_source(self.split, decoders=skip or None)
    return [self._source[int(i)] for i in self.indices[start:stop]]

  def raw(self, start: int, stop: int) -> list[Image.Image]:
    """The decoded RGB images of records [start, stop), before any preprocessing."""
    return [images_lib.open_rgb(r['image']) for r in self._records(start, stop)]

  def images(self, start: int, stop: int) -> np.ndarray:
    out = [prepare_image(img, self.img_size, self.preprocess) for img in self.raw(start, stop)]
    return np.stack([np.asarray(x) for x in out]).astype(np.uint8)

  def meta(self) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for start in range(0, len(self), 256):
      for r in self._records(start, min(len(self), start + 256)):
        for k in ('label', 'file_name'):
          if k in r:
            v = r[k]
            out.setdefault(k, []).append(v.decode() if isinstance(v, bytes) else v)
        if self.depth_sub:
          d = prepare_depth(r['depth'], self.img_size, self.depth_sub, self.eigen_crop)
          out.setdefault('depth', []).append(d)
    return {k: np.asarray(v) for k, v in out.items()}


@dataclasses.dataclass
class Mirrored:
  """An image set flipped left-right (same meta: a prediction is flipped back, not the truth)."""

  base: object

  def __post_init__(self):
    self.name = f'{self.base.name}_flip'

  @property
  def identity(self) -> dict:
    return {**self.base.identity, 'mirrored': True}

  def __len__(self) -> int:
    return len(self.base)

  def meta(self) -> dict[str, np.ndarray]:
    return self.base.meta()

  def images(self, start: int, stop: int) -> np.ndarray:
    return self.base.images(start, stop)[:, :, ::-1]
