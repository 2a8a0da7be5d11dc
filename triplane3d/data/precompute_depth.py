"""Precomputes pseudo depth for a TFDS image split with a `transformers` depth model.

  python -m triplane3d.data.precompute_depth --name=imagenet2012 --split=train \
      --data_dir=DATA_DIR --model=Intel/zoedepth-nyu-kitti [--depth_name=imagenet2012_depth] \
      [--shard_index=0 --num_shards=1] [--batch_size=16] [--max_side=256]

Writes the depth dataset (`depth_format`) record-aligned with the images. The work is cut into
shards of `--records_per_shard` images, each one ArrayRecord file written atomically: a
restarted run skips finished shards, and `--shard_index/--num_shards` splits the shards across
machines (shard w goes to machine w % num_shards). Whichever run completes the last shard writes
the TFDS metadata. Runs on GPU when torch sees one. A tqdm bar shows rate and ETA.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict

import numpy as np
from absl import app, flags, logging
from PIL import Image

from triplane3d.data import depth_format, records, sources


def _target_size(h: int, w: int, max_side: int) -> tuple[int, int]:
  """Storage size of a depth map: the image's aspect ratio, longer side ≤ max_side."""
  s = min(1.0, max_side / max(h, w))
  return max(1, round(h * s)), max(1, round(w * s))


class DepthModel:
  """A `transformers` depth model + its processor: PIL images → raw depth maps (h, w)."""

  def __init__(self, model: str, device: str | None = None):
    import torch  # Heavy, optional dependency: only the precompute tool needs it.
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    self.torch = torch
    self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    self.processor = AutoImageProcessor.from_pretrained(model)
    self.model = AutoModelForDepthEstimation.from_pretrained(model).to(self.device).eval()
    # ZoeDepth reflect-pads its input against border artefacts; the padding is cut off again.
    self._zoe_pad = self.model.config.model_type == 'zoedepth' and getattr(
      self.processor, 'do_pad', False
    )

  def _resize(self, depth_hw, source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    # The processors' own post-processing, done here because transformers 5's PIL-backend
    # ZoeDepth processor needs torchvision for it (which we must not depend on).
    f = self.torch.nn.functional
    d = depth_hw[None, None].float()
    if self._zoe_pad:
      ph, pw = int(np.sqrt(source[0] / 2) * 3), int(np.sqrt(source[1] / 2) * 3)
      size = (source[0] + 2 * ph, source[1] + 2 * pw)
      d = f.interpolate(d, size=size, mode='bicubic', align_corners=False)
      d = d[..., ph : ph + source[0], pw : pw + source[1]]
    d = f.interpolate(d, size=tuple(target), mode='bicubic', align_corners=False)
    return d[0, 0].cpu().numpy()

  def __call__(self, images: list[Image.Image], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Depth of each image, resized to `sizes[i]` = (h, w); float32 arrays."""
    inputs = [self.processor(images=im, return_tensors='pt')['pixel_values'] for im in images]
    # Group equal input shapes (aspect ratio buckets) into one forward pass each.
    groups = defaultdict(list)
    for i, x in enumerate(inputs):
      groups[tuple(x.shape)].append(i)
    out = [None] * len(images)
    for idx in groups.values():
      pixels = self.torch.cat([inputs[i] for i in idx]).to(self.device)
      with self.torch.inference_mode():
        pred = self.model(pixel_values=pixels)
      for i, d in zip(idx, pred.predicted_depth):
        out[i] = self._resize(d, (images[i].height, images[i].width), sizes[i])
    return out


def _shard_records(images, model: DepthModel, lo: int, hi: int, batch_size: int, max_side, bar):
  for start in range(lo, hi, batch_size):
    batch = [images[i] for i in range(start, min(hi, start + batch_size))]
    keys, pils, sizes, ok = [], [], [], []
    for rec in batch:
      keys.append(sources.example_key(rec))
      try:
        im = Image.open(io.BytesIO(bytes(rec['image']))).convert('RGB')
        pils.append(im)
        sizes.append(_target_size(im.height, im.width, max_side))
        ok.append(True)
      except Exception as err:  # Corrupt image: keep alignment with a placeholder record.
        logging.warning('image %r is unreadable (%s); writing a placeholder depth.', keys[-1], err)
        ok.append(False)
    depths = iter(model(pils, sizes) if pils else [])
    for key, good in zip(keys, ok):
      yield depth_format.encode(next(depths) if good else np.ones((1, 1)), key)
    bar.update(len(batch))


def precompute(
  name: str,
  split: str,
  data_dir: str,
  model: str | DepthModel,
  *,
  depth_name: str | None = None,
  out_data_dir: str | None = None,
  records_per_shard: int = 4096,
  shard_index: int = 0,
  num_shards: int = 1,
  batch_size: int = 16,
  max_side: int = 256,
  max_work_shards: int | None = None,
) -> int:
  """Computes missing depth shards of this machine's share. Returns images processed.

  Args:
    name, split, data_dir: the image dataset.
    model: a `transformers` model name / directory, or a loaded DepthModel.
    depth_name: output dataset name (default NAME_depth), under out_data_dir (default data_dir).
    records_per_shard: images per output file (the unit of resumption).
    shard_index, num_shards: this machine's share of the output files.
    max_work_shards: stop after this many newly written shards (to bound a job's time).
  """
  from tqdm import tqdm

  depth_name = depth_name or f'{name}_depth'
  out_dir = out_data_dir or data_dir
  images = records.open_split(data_dir, name, split)
  n = len(images)
  total = max(1, math.ceil(n / records_per_shard))
  bounds = [(w * n // total, (w + 1) * n // total) for w in range(total)]
  todo = [
    w
    for w in range(shard_index, total, num_shards)
    if not records.shard_done(out_dir, depth_name, split, w, total)
  ][:max_work_shards]
  if todo and not isinstance(model, DepthModel):
    model = DepthModel(model)
  count = sum(bounds[w][1] - bounds[w][0] for w in todo)
  feats = depth_format.features()
  with tqdm(total=count, unit='img', desc=f'{depth_name}/{split}', smoothing=0.05) as bar:
    for w in todo:
      recs = _shard_records(images, model, *bounds[w], batch_size, max_side, bar)
      records.write_shard(out_dir, depth_name, split, feats, recs, w, total)
  if records.all_shards_done(out_dir, depth_name, split, total):
    records.finalize(
      out_dir, depth_name, feats, f'Depth for {name} by triplane3d precompute_depth.'
    )
  return count


def _define_flags():
  # Only when run as a program: importing this module must not register global absl flags.
  flags.DEFINE_string('name', None, 'Image dataset name (TFDS).', required=True)
  flags.DEFINE_string('split', 'train', 'Split.')
  flags.DEFINE_string('data_dir', '', 'TFDS data dir of the images.')
  flags.DEFINE_string('model', 'Intel/zoedepth-nyu-kitti', 'transformers depth model / dir.')
  flags.DEFINE_string('depth_name', None, 'Output dataset name (default NAME_depth).')
  flags.DEFINE_string('out_data_dir', None, 'Output data dir (default --data_dir).')
  flags.DEFINE_integer('records_per_shard', 4096, 'Images per output shard (resume unit).')
  flags.DEFINE_integer('shard_index', 0, 'This machine: index among --num_shards.')
  flags.DEFINE_integer('num_shards', 1, 'Machines sharing the work.')
  flags.DEFINE_integer('batch_size', 16, 'Images per forward pass.')
  flags.DEFINE_integer('max_side', 256, 'Longer side of stored depth maps (never upsampled).')


def main(argv):
  del argv
  f = flags.FLAGS
  precompute(
    f.name,
    f.split,
    f.data_dir,
    f.model,
    depth_name=f.depth_name,
    out_data_dir=f.out_data_dir,
    records_per_shard=f.records_per_shard,
    shard_index=f.shard_index,
    num_shards=f.num_shards,
    batch_size=f.batch_size,
    max_side=f.max_side,
  )


if __name__ == '__main__':
  _define_flags()
  app.run(main)
