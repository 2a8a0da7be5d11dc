"""Joint image + depth augmentation: one random resized crop and flip for both.

`DecodeAugment` turns a joined record (`sources.ImageDepthSource`) into the training example:

  image  (S, S, 3) float32  backbone input, ImageNet-normalised (S = config.model.img_size)
  rgb    (R, R, 3) float32  reconstruction target in [0, 1] (R = config.render.resolution)
  depth  (R, R, 1) float32  target depth, mapped into [camera.near, camera.far] (`map_depth`)
  label  ()        int32

With `float_pixels=False` 'image' and 'rgb' stay the uint8 pixels they are made from, (S, S,
3) and (R, R, 3): the wire format the trainer uses, a quarter of the pixels' bytes from the
grain workers to the devices. `float_pixels(example)` turns them into the float32 layout
above, on numpy or (jitted, on the devices) on jax arrays.

The crop box is drawn once in the image's pixel coordinates and applied to the depth map in
normalised coordinates (depth may be stored at a lower resolution), so all three outputs show
the same region. Images are decoded by `images.open_rgb` (16-bit greyscale scaled, EXIF
orientation applied, transparency over white). Both are resized straight from the source with PIL's antialiased bilinear
filter (crop and resize in one step, sub-pixel box), then flipped together.

A record whose image or depth cannot be decoded is skipped (the transform returns None, which
grain treats as filtered out), logged with its key and counted; if the skipped fraction grows
past `max_bad_fraction`, `TooManyCorruptImagesError` stops the run.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from absl import logging
from PIL import Image

from triplane3d.data import depth_format, images

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)


def imagenet_normalize(pixels) -> np.ndarray:
  """Pixels (..., 3) in [0, 255] (uint8 or float; numpy, or jax arrays under `jax.jit`) →
  float32 backbone input: ImageNet mean/std."""
  x = pixels.astype(np.float32) if hasattr(pixels, 'astype') else np.asarray(pixels, np.float32)
  return (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def float_pixels(example: dict) -> dict:
  """An example or batch with uint8 'image' and 'rgb' (`DecodeAugment(float_pixels=False)`) →
  the float32 layout: 'image' ImageNet-normalised, 'rgb' in [0, 1]; other fields as they are.

  The same operations as `DecodeAugment`'s own conversion, on numpy or jax arrays (works under
  `jax.jit`). Jitted, XLA multiplies by the reciprocals of 255 and of the std instead of
  dividing, so the values can differ from numpy's by a few float32 roundings: at most 7.2e-7
  over all 256 × 3 pixel values (tests/data/test_pipeline.py).
  """
  out = dict(example)
  out['image'] = imagenet_normalize(example['image'])
  out['rgb'] = example['rgb'].astype(np.float32) / 255.0
  return out


def imagenet_denormalize(image) -> np.ndarray:
  """The inverse of `imagenet_normalize`, to [0, 1] (for looking at backbone inputs)."""
  return np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN


_FLAT_RELATIVE_RANGE = 1e-4  # map_depth: relative depth ranges below this count as flat.


class TooManyCorruptImagesError(RuntimeError):
  pass


def random_resized_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box: (left, top, right, bottom) in pixels."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  # Fallback: a centre crop with the aspect ratio clamped into range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def map_depth(
  depth: np.ndarray,
  near: float,
  far: float,
  rule: str = 'percentile',
  lo_percentile: float = 2.0,
  hi_percentile: float = 98.0,
  is_disparity: bool = False,
) -> np.ndarray:
  """Maps a raw depth map (any shape) into [near, far] by one of the `config.depth` rules.

  'percentile' / 'minmax': a per-image affine map sending the lo/hi percentile (min/max) to
  near/far, then clipped; a constant or nearly constant map (range below 1e-4 of its
  magnitude) goes to the middle of the range. Disparity maps are
  negated first (an affine map cannot invert, and relative disparity has no usable offset).
  'none': the depth is already metric in the scene's range; it is only clipped.
  """
  d = np.asarray(depth, np.float32)
  if rule == 'none':
    if is_disparity:
      raise ValueError("depth.normalize='none' needs metric depth, not disparity.")
    return np.clip(d, near, far)
  if is_disparity:
    d = -d
  if rule == 'percentile':
    lo, hi = np.percentile(d, [lo_percentile, hi_percentile])
  elif rule == 'minmax':
    lo, hi = d.min(), d.max()
  else:
    raise ValueError(f"unknown depth.normalize {rule!r}: 'percentile', 'minmax' or 'none'.")
  # Nearly flat maps are flat: stretching a range of numerical noise (say 1e-6 of the depth)
  # to [near, far] would invent structure.
  if not hi - lo > _FLAT_RELATIVE_RANGE * max(abs(hi), abs(lo), 1e-12):
    return np.full_like(d, 0.5 * (near + far))
  return np.clip(near + (d - lo) * ((far - near) / (hi - lo)), near, far).astype(np.float32)


def _resize(img: Image.Image, size: int, box) -> np.ndarray:
  return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box))


class DecodeAugment(grain.transforms.RandomMap):
  """Decode + joint random resized crop / flip + targets. Module level: picklable for workers.

  Args:
    img_size: S, the backbone input side.
    resolution: R, the rendered (target) side.
    crop_scale, crop_ratio: RandomResizedCrop ranges; flip: random horizontal flip.
    near, far: the camera's depth range (from `Camera`).
    depth_rule, lo_percentile, hi_percentile, is_disparity: `map_depth` arguments.
    max_bad_fraction: stop when more than this fraction of records fails to decode.
    float_pixels: False keeps 'image' and 'rgb' as uint8 pixels (see the module docstring).

  `seen` and `skipped` count the records this transform has read and skipped as corrupt. They
  belong to the pipeline that holds it: each grain worker process (num_workers > 0) counts its
  own share on its own copy, and two pipelines in one process never mix their counts.
  """

  def __init__(
    self,
    *,
    img_size: int,
    resolution: int,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip: bool = True,
    near: float = 1.5,
    far: float = 2.5,
    depth_rule: str = 'percentile',
    lo_percentile: float = 2.0,
    hi_percentile: float = 98.0,
    is_disparity: bool = False,
    max_bad_fraction: float = 0.001,
    float_pixels: bool = True,
  ):
    self.img_size, self.resolution = int(img_size), int(resolution)
    self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
    self.flip, self.near, self.far = flip, float(near), float(far)
    self.depth_args = dict(
      rule=depth_rule,
      lo_percentile=lo_percentile,
      hi_percentile=hi_percentile,
      is_disparity=is_disparity,
    )
    self.max_bad_fraction = float(max_bad_fraction)
    self.float_pixels = bool(float_pixels)
    self.seen = self.skipped = 0
    map_depth(np.zeros(1), self.near, self.far, **self.depth_args)  # Validate the rule now.

  def _skip(self, key: str, err: Exception) -> None:
    self.skipped += 1
    logging.warning('skipping corrupt record %r (%s: %s)', key, type(err).__name__, err)
    # At least 1 / fraction records before judging, so one early failure is not fatal.
    budget = self.max_bad_fraction * max(self.seen, 1.0 / max(self.max_bad_fraction, 1e-9))
    if self.skipped > budget:
      raise TooManyCorruptImagesError(
        f'{self.skipped} of {self.seen} records failed to decode in this process '
        f'(max_bad_fraction={self.max_bad_fraction}); last: {key!r}: {err}'
      ) from err

  def random_map(self, element: dict, rng: np.random.Generator) -> dict | None:
    self.seen += 1
    try:
      img = images.open_rgb(element['image'])  # Full decode: truncated files fail here.
      depth = depth_format.decode(element['depth'], element['depth_range'])
    except Exception as err:  # Any decoder failure means a corrupt record.
      self._skip(element['key'], err)
      return None
    w, h = img.size
    left, top, right, bottom = random_resized_crop_box(rng, h, w, self.crop_scale, self.crop_ratio)
    sx, sy = depth.shape[1] / w, depth.shape[0] / h
    depth_box = (left * sx, top * sy, right * sx, bottom * sy)
    box = (left, top, right, bottom)
    image = _resize(img, self.img_size, box)
    rgb = image if self.resolution == self.img_size else _resize(img, self.resolution, box)
    d = _resize(Image.fromarray(depth), self.resolution, depth_box)  # float32 → mode 'F'.
    if self.flip and rng.random() < 0.5:
      image, rgb, d = image[:, ::-1], rgb[:, ::-1], d[:, ::-1]
    out = {  # Flipped views stay views until batched (or placed on the devices).
      'image': image,
      'rgb': rgb,
      'depth': map_depth(d, self.near, self.far, **self.depth_args)[..., None],
      'label': np.int32(element['label']),
    }
    return float_pixels(out) if self.float_pixels else out
