"""Tiny on-disk datasets for the data tests: images whose pixels encode their position.

Image `i` (W×H) has R = column centre u = (x + 0.5) / W and G = row centre v = (y + 0.5) / H
(8-bit), B = code(i) = 5 i + 3 (its identity). Its depth, stored at half resolution, is the
known function `depth_of(u, v)` of the same normalised position, so any crop or flip that
differs between image and depth shows up as a mismatch.
"""

import io
import itertools

import numpy as np
from PIL import Image

from triplane3d.data import depth_format, records

W, H = 48, 40
NAME, DEPTH_NAME = 'posimg', 'posimg_depth'


def depth_of(u, v):
  return 1.6 + 0.5 * u + 0.3 * v


def index_of(b_channel_01):
  """Recovers example indices from (mean) blue values in [0, 1]."""
  return np.round((np.asarray(b_channel_01) * 255 - 3) / 5).astype(int)


def image(i: int) -> np.ndarray:
  u = (np.arange(W) + 0.5) / W
  v = (np.arange(H) + 0.5) / H
  uu, vv = np.meshgrid(u, v)
  rgb = np.stack([uu, vv, np.full_like(uu, (5 * i + 3) / 255)], -1)
  return np.round(rgb * 255).astype(np.uint8)


def png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format='PNG')
  return buf.getvalue()


def depth_map() -> np.ndarray:
  u = (np.arange(W // 2) + 0.5) / (W // 2)
  v = (np.arange(H // 2) + 0.5) / (H // 2)
  uu, vv = np.meshgrid(u, v)
  return depth_of(uu, vv)


def write(data_dir, n=32, corrupt=(), swap=None, num_shards=2):
  """Writes NAME (+ DEPTH_NAME) with n records; `corrupt` indices get undecodable images and
  `swap=(i, j)` swaps two depth records (a misaligned depth dataset)."""
  import tensorflow_datasets as tfds

  feats = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=3),
      'file_name': tfds.features.Text(),
    }
  )
  imgs = [
    {
      'image': png(image(i))[:60] if i in corrupt else png(image(i)),
      'label': i % 3,
      'file_name': f'img_{i:03d}.png',
    }
    for i in range(n)
  ]
  deps = [depth_format.encode(depth_map(), f'img_{i:03d}.png') for i in range(n)]
  if swap:
    a, b = swap
    deps[a], deps[b] = deps[b], deps[a]
  cut = [k * n // num_shards for k in range(num_shards + 1)]
  records.write_dataset(
    data_dir, NAME, feats, {'train': [imgs[a:b] for a, b in itertools.pairwise(cut)]}
  )
  dfe = depth_format.features()
  records.write_dataset(
    data_dir, DEPTH_NAME, dfe, {'train': [deps[a:b] for a, b in itertools.pairwise(cut)]}
  )


def config(data_dir, batch_size=8, workers=0):
  from triplane3d.configs import common

  c = common.get_base_config()
  c.data.data_dir = str(data_dir)
  c.data.name, c.data.depth_name = NAME, DEPTH_NAME
  c.data.num_workers = workers
  c.data.crop_scale = (0.25, 1.0)
  c.data.max_bad_fraction = 0.1
  c.depth.normalize = 'none'
  c.model.img_size = 24
  c.render.resolution = 32
  c.train.batch_size = batch_size
  return c
