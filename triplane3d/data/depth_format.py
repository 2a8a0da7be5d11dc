"""The on-disk format of precomputed depth: one TFDS ArrayRecord record per image.

A depth dataset is a TFDS dataset (ArrayRecord files + `dataset_info.json`) whose split `s`
has exactly as many records as the image dataset's split `s`, in the same order: record `i`
holds the depth of image record `i`. Each record has

  key          Text     the image's stable key (`sources.example_key`): its `file_name`
                        when the image dataset has one, else a content hash of its bytes.
  depth        bytes    a 16-bit greyscale PNG of shape (h, w) holding 12-bit codes: the depth
                        quantised linearly between `depth_range[0]` (→ 0) and `depth_range[1]`
                        (→ 4095).
  depth_range  float32  (2,): the per-image (min, max) of the raw model output.

The raw model output is stored (distance for ZoeDepth, disparity for disparity models): the
mapping into the renderer's [near, far] range is a training-time choice (`config.depth`), so
it can change without recomputing anything. (h, w) keeps the image's aspect ratio with the
longer side at most `max_side` (precompute tool flag, 256 by default, never upsampled);
augmentations crop depth in normalised coordinates, so depth and image need not have the same
resolution. Quantisation error: at most (max − min) / 8190 per pixel, e.g. 1.2 mm for a 10 m
range, 1.2e-4 of the renderer's depth range after normalisation — far below any monocular
model's error. 12 rather than 16 bits: the low bits of a model's depth are noise that PNG
cannot compress (16 bits cost 2.2× the bytes). See docs/data.md for the storage estimate.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

_LEVELS = 4095  # 12-bit codes in a 16-bit PNG (see the module docstring).


def features() -> tfds.features.FeaturesDict:
  """The TFDS feature spec of a depth dataset."""
  return tfds.features.FeaturesDict(
    {
      'key': tfds.features.Text(),
      'depth': tfds.features.Tensor(shape=(), dtype=np.object_),
      'depth_range': tfds.features.Tensor(shape=(2,), dtype=np.float32),
    }
  )


def encode(depth_hw: np.ndarray, key: str) -> dict:
  """Encodes one depth map (h, w) float → a record for `features()`.

  Non-finite values (a model's inf/NaN) are stored as the largest finite depth.
  """
  d = np.asarray(depth_hw, np.float64)
  if d.ndim == 3 and d.shape[-1] == 1:
    d = d[..., 0]
  if d.ndim != 2:
    raise ValueError(f'depth must be (h, w), got shape {d.shape} for key {key!r}.')
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
