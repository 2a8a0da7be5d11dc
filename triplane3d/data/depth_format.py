"""The on-disk format of precomputed depth: one TFDS ArrayRecord record per image.

A depth dataset is a TFDS dataset (ArrayRecord files + `dataset_info.json`) whose split `s`
has exactly as many records as the image dataset's split `s`, in the same order: record `i`
holds the depth of image record `i`. Each record has

  key          Text     the image's stable key (`sources.example_key`): its `file_name`
                        when the image dataset has one, else a content hash of its bytes.
  image_hash   Text     `content_hash` of the image record's encoded bytes, so a photo edited
                        in place (same key, new bytes) is caught; '' when unknown (datasets
                        written without it, e.g. synthetic scenes, whose depth is exact).
  depth        bytes    a 16-bit greyscale PNG of shape (h, w) holding 12-bit codes: the depth
                        quantised linearly between `depth_range[0]` (→ 0) and `depth_range[1]`
                        (→ 4095).
  depth_range  float32  (2,): the per-image (min, max) of the raw model output.

The raw model output is stored (distance for ZoeDepth, disparity for disparity models): the
mapping into the renderer's [near, far] range is a training-time choice (`config.depth`), so
it can change without recomputing anything. Which one it is, and for which images, is recorded
per split in `depth_info-SPLIT.json` beside TFDS's metadata (`write_info` / `read_info`):

  output            'distance' (larger = farther: ZoeDepth, metric Depth Anything, GLPN) or
                    'disparity' (relative inverse depth: DPT, relative Depth Anything).
  model, model_type the `transformers` model (name or directory) and its config.model_type.
  images            {'name', 'split', 'num_records'} of the image dataset, and once every shard
                    is done its 'fingerprint' (`split_fingerprint`).
  records_per_shard, num_shards, max_side   the precompute tool's settings (resume refuses
                    another sharding).
Each shard file also has a sidecar `<shard>.json` ({'num_records', 'fingerprint', 'model',
'output'}): `shard_fingerprint` of its image records, so a rerun can tell which shards are stale. (h, w) keeps the image's aspect ratio with the
longer side at most `max_side` (precompute tool flag, 256 by default, never upsampled);
augmentations crop depth in normalised coordinates, so depth and image need not have the same
resolution. Quantisation error: at most (max − min) / 8190 per pixel, e.g. 1.2 mm for a 10 m
range, 1.2e-4 of the renderer's depth range after normalisation — far below any monocular
model's error. 12 rather than 16 bits: the low bits of a model's depth are noise that PNG
cannot compress (16 bits cost 2.2× the bytes). See docs/data.md for the storage estimate.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from triplane3d.data import records

_LEVELS = 4095  # 12-bit codes in a 16-bit PNG (see the module docstring).


def features() -> tfds.features.FeaturesDict:
  """The TFDS feature spec of a depth dataset."""
  return tfds.features.FeaturesDict(
    {
      'key': tfds.features.Text(),
      'image_hash': tfds.features.Text(),
      'depth': tfds.features.Tensor(shape=(), dtype=np.object_),
      'depth_range': tfds.features.Tensor(shape=(2,), dtype=np.float32),
    }
  )


def as_hw(depth, what: str) -> np.ndarray:
  """A depth map (H, W) or (H, W, 1) as float64 (H, W); a ValueError naming `what` else."""
  d = np.asarray(depth, np.float64)
  if d.ndim == 3 and d.shape[-1] == 1:
    d = d[..., 0]
  if d.ndim != 2:
    raise ValueError(f'{what} must be (H, W) or (H, W, 1), got shape {np.shape(depth)}.')
  return d


def encode(depth_hw: np.ndarray, key: str, image_hash: str = '') -> dict:
  """Encodes one depth map (h, w) float → a record for `features()`.

  `image_hash`: `content_hash` of the image's encoded bytes ('' = unknown, not checked).
  Non-finite values (a model's inf/NaN) are stored as the largest finite depth.
  """
  d = as_hw(depth_hw, f'depth for key {key!r}')
  finite = np.isfinite(d)
  if not finite.any():
    raise ValueError(f'depth for key {key!r} has no finite values.')
  # Quantise against the float32 range that is stored, so decode reproduces the grid exactly.
  lo, hi = float(np.float32(d[finite].min())), float(np.float32(d[finite].max()))
  d = np.where(finite, d, hi)
  scale = (hi - lo) if hi > lo else 1.0
  q = np.clip(np.round((d - lo) / scale * _LEVELS), 0, _LEVELS).astype(np.uint16)
  buf = io.BytesIO()
  # compress_level 6: ~3x faster than 9 for a few % larger files; depth is written once.
  Image.fromarray(q).save(buf, format='PNG', compress_level=6)
  return {
    'key': key,
    'image_hash': image_hash,
    'depth': buf.getvalue(),
    'depth_range': np.asarray([lo, hi], np.float32),
  }


def decode(depth_png: bytes, depth_range: np.ndarray) -> np.ndarray:
  """Decodes a stored depth record → float32 (h, w) in the model's raw units."""
  q = np.asarray(Image.open(io.BytesIO(depth_png)), dtype=np.float32)
  if q.ndim != 2:
    raise ValueError(f'stored depth must be a single-channel PNG, got shape {q.shape}.')
  lo, hi = (float(v) for v in np.asarray(depth_range, np.float64))
  scale = (hi - lo) if hi > lo else 1.0
  return (lo + q * (scale / _LEVELS)).astype(np.float32)


def max_quantisation_error(depth_range: np.ndarray) -> float:
  """Worst-case absolute error of `decode(encode(d))` for a map whose (min, max) is given."""
  lo, hi = (float(v) for v in depth_range)
  return (hi - lo) / (2 * _LEVELS) + 1e-6 * max(abs(lo), abs(hi))


OUTPUTS = ('distance', 'disparity')


def content_hash(image_bytes: bytes) -> str:
  """The `image_hash` of an image record: sha1 of its encoded bytes (hex)."""
  return hashlib.sha1(bytes(image_bytes)).hexdigest()


def shard_fingerprint(entries: Iterable[tuple[str, str]]) -> str:
  """sha1 over the (key, image_hash) pairs of consecutive image records, in order."""
  h = hashlib.sha1()
  for key, image_hash in entries:
    h.update(f'{key}\0{image_hash}\n'.encode())
  return h.hexdigest()


def split_fingerprint(shard_fingerprints: Iterable[str]) -> str:
  """The image split's fingerprint: sha1 over its shards' fingerprints in order (the sharding,
  `records_per_shard`, is stored beside it, so equal images and settings give equal values)."""
  return hashlib.sha1('\n'.join(shard_fingerprints).encode()).hexdigest()


def info_path(data_dir: str, name: str, split: str) -> str:
  return os.path.join(records.dataset_dir(data_dir, name), f'depth_info-{split}.json')


def read_info(data_dir: str, name: str, split: str) -> dict | None:
  """The split's `depth_info` (see the module docstring), or None when it has none."""
  return read_json(info_path(data_dir, name, split))


def shard_info_path(data_dir: str, name: str, split: str, shard: int, num_shards: int) -> str:
  """The sidecar of one depth shard file (see the module docstring)."""
  return records.shard_path(data_dir, name, split, shard, num_shards) + '.json'


def read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: dict) -> None:
  """Writes `obj` atomically (several machines may write the same file)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def write_info(data_dir: str, name: str, split: str, info: dict) -> None:
  if info.get('output') not in OUTPUTS:
    raise ValueError(f'depth_info output must be one of {OUTPUTS}, got {info.get("output")!r}.')
  write_json(info_path(data_dir, name, split), info)
