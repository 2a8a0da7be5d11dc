"""The nyu_depth suite: a depth probe on NYU-Depth v2, read from TFDS or from a folder.

Probes (`config.nyu_depth.probe`):
  linear  DINOv2's linear depth protocol (depth_linear.py): trained on `num_train` training
          images, scored on `num_test` test images (with the mirrored test images averaged in
          when `test_flip`). The default.
  ridge   the closed-form per-patch ridge probe (depth_probe.py), α chosen on `num_val` further
          training images: minutes on a CPU, but not DINOv2's protocol.
Both are scored by depth_linear.metrics (per image over min_depth < gt < max_depth: RMSE,
abs-rel, δ1, then the mean over images) against the training mean depth.

Data: the TFDS `nyu_depth_v2` builder (ArrayRecord; train 47,584 frames, validation = the 654
labelled test frames), or, with `folder`, the layout of the Monocular-Depth-Estimation-Toolbox
that DINOv2 trains with: `folder/<train_list>` and `folder/<test_list>`, one line per frame,
'RGB_PATH DEPTH_PATH FOCAL' relative to `folder` (DEPTH_PATH 'None' lines skipped), depth PNGs
in millimetres (uint16, divided by 1000). Images are preprocessed as datasets.TfdsImages
('dinov2' centre crop at img_size); `depth_sub` = 14 keeps the depth at full resolution
(S×S); `eigen_crop` drops the ground truth outside Eigen's crop of the 480×640 frames.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from triplane3d.data import images as images_lib
from triplane3d.evaluate import datasets, depth_linear, depth_probe

PROBES = ('linear', 'ridge')
FOLDER_HOW_TO = (
  'prepare NYU-Depth v2 as for DINOv2 (the Monocular-Depth-Estimation-Toolbox layout: '
  'nyu/nyu_train.txt, nyu/nyu_test.txt and the frames they list) and pass '
  '--config.nyu_depth.folder=DIR, or leave folder empty to read the TFDS nyu_depth_v2 builder'
)


@dataclasses.dataclass
class NyuFolder:
  """Frames of one list file of a toolbox-layout folder, as a `features.ImageSet`."""

  name: str
  folder: str
  list_file: str
  img_size: int
  limit: int = 0
  skip: int = 0
  depth_sub: int = 14
  eigen_crop: bool = True

  def __post_init__(self):
    path = os.path.join(self.folder, self.list_file)
    if not os.path.isfile(path):
      raise datasets.DatasetMissingError(
        f'NYU list file {path} not found; to get it, {FOLDER_HOW_TO}.'
      )
    with open(path) as f:
      rows = [line.split() for line in f if line.strip()]
    self.frames = [(r[0].lstrip('/'), r[1].lstrip('/')) for r in rows if r[1] != 'None']
    if not self.frames:
      raise datasets.DatasetMissingError(f'{path} lists no frame with depth; {FOLDER_HOW_TO}.')
    self.indices = datasets.subset(len(self.frames), self.limit, self.skip)
    self._stat = os.stat(path)

  @property
  def identity(self) -> dict:
    return {
      'folder': os.path.abspath(self.folder),
      'list_file': self.list_file,
      'list_size_mtime': [self._stat.st_size, self._stat.st_mtime_ns],
      'num_frames': len(self.frames),
      'limit': self.limit,
      'skip': self.skip,
      'img_size': self.img_size,
      'preprocess': 'dinov2',
      'depth_sub': self.depth_sub,
      'eigen_crop': self.eigen_crop,
    }

  def __len__(self) -> int:
    return len(self.indices)

  def images(self, start: int, stop: int) -> np.ndarray:
    out = []
    for i in self.indices[start:stop]:
      with open(os.path.join(self.folder, self.frames[i][0]), 'rb') as f:
        img = images_lib.open_rgb(f.read())
      out.append(np.asarray(datasets.prepare_image(img, self.img_size)))
    return np.stack(out).astype(np.uint8)

  def meta(self) -> dict[str, np.ndarray]:
    depth = []
    for i in self.indices:
      with Image.open(os.path.join(self.folder, self.frames[i][1])) as im:
        d = np.asarray(im, np.float32) / 1000.0  # The toolbox's depth_scale.
      depth.append(datasets.prepare_depth(d, self.img_size, self.depth_sub, self.eigen_crop))
    return {
      'depth': np.stack(depth),
      'file_name': np.asarray([self.frames[i][0] for i in self.indices]),
    }


class NyuDepthSuite:
  """See the module docstring; `config.nyu_depth` holds the data, probe and settings."""

  name = 'nyu_depth'

  def __init__(self, config, workdir: str):
    del workdir
    self.config, self.c = config, config.nyu_depth
    self.probe = str(self.c.probe)
    if self.probe not in PROBES:
      raise ValueError(f'nyu_depth.probe must be one of {PROBES}, got {self.probe!r}.')
    if int(self.c.depth_sub) not in (1, 2, 7, 14):
      raise ValueError(f'nyu_depth.depth_sub must be 1, 2, 7 or 14, got {self.c.depth_sub}.')
    self.settings = depth_linear.Settings.from_config(self.c)
    self.columns = (
      ('rmse', f'NYU depth RMSE ({self.probe})', False, 'float'),
      ('abs_rel', 'NYU abs-rel', False, 'float'),
      ('delta1', 'NYU δ1', True, 'percent'),
    )
    self.sets: dict = {}

  def check(self) -> None:
    c, s = self.c, int(self.config.img_size)
    kw = {'depth_sub': int(c.depth_sub), 'eigen_crop': bool(c.eigen_crop)}
    ridge = self.probe == 'ridge'
    if c.folder:
      folder = os.path.expanduser(str(c.folder))

      def make(name, list_file, limit, skip=0):
        return NyuFolder(f'nyu_{name}', folder, str(list_file), s, int(limit), int(skip), **kw)

      train_list, test_list = c.train_list, c.test_list
    else:
      b = datasets.find(self.config.data_dir, c.dataset, [c.train_split, c.test_split])

      def make(name, split, limit, skip=0):
        return datasets.TfdsImages(f'{c.dataset}_{name}', b, split, s, limit, skip, **kw)

      train_list, test_list = c.train_split, c.test_split
    self.sets = {'depth_train': make('fit', train_list, c.num_train)}
    if ridge:
      self.sets['depth_val'] = make('select', train_list, c.num_val, c.num_train)
    self.sets['depth_test'] = make('test', test_list, c.num_test)
    if c.test_flip and not ridge:
      self.sets['depth_test_flip'] = datasets.Mirrored(self.sets['depth_test'])

  def image_sets(self):
    return [(k, v, True) for k, v in self.sets.items()]

  def protocol(self) -> dict:
    return {
      'img_size': int(self.config.img_size),
      'sets': {k: v.identity for k, v in self.sets.items()},
      'depth_probe': self.probe,
      'settings': dataclasses.asdict(self.settings),
      'version': depth_linear.VERSION if self.probe == 'linear' else depth_probe.VERSION,
    }

  def evaluate(self, feats: dict, context: dict) -> dict:
    del context
    s, train, test = self.settings, feats['depth_train'], feats['depth_test']
    if self.probe == 'linear':
      r = depth_linear.evaluate(train, test, s, feats.get('depth_test_flip'))
    else:
      probe = depth_probe.fit(train, feats['depth_val'])
      pred = np.clip(depth_probe.predict(probe, test), s.min_depth, s.max_depth)
      gt_train = np.asarray(train['meta_depth'], np.float64)
      mean = float(gt_train[(gt_train > s.min_depth) & (gt_train < s.max_depth)].mean())
      base = depth_linear.metrics(np.full(test['meta_depth'].shape, mean), test['meta_depth'], s)
      r = {
        **depth_linear.metrics(pred, test['meta_depth'], s),
        'baselines': {'mean_depth': {'value': mean, **base}},
        'alpha': probe['alpha'],
        'val_rmse_per_alpha': probe['val_rmse_per_alpha'],
      }
    base = r['baselines']['mean_depth']
    return {
      'metrics': {k: r[k] for k in ('rmse', 'abs_rel', 'delta1')},
      'baselines': {k: (base[k], 'mean depth') for k in ('rmse', 'abs_rel', 'delta1')},
      'details': {'depth': r},
    }
