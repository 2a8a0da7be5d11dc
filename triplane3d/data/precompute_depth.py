"""Precomputes pseudo depth for a TFDS image split with a `transformers` depth model.

  python -m triplane3d.data.precompute_depth --name=imagenet2012 --split=train \
      --data_dir=DATA_DIR --model=Intel/zoedepth-nyu-kitti [--depth_name=imagenet2012_depth] \
      [--shard_index=0 --num_shards=1] [--batch_size=16] [--max_side=256] [--overwrite]

Writes the depth dataset (`depth_format`) record-aligned with the images, with the model, its
output kind (distance or disparity: training picks `depth.is_disparity` from it) and the
sharding in `depth_info-SPLIT.json`. The work is cut into shards of `--records_per_shard`
images, each one ArrayRecord file written atomically with a sidecar holding the fingerprint of
the image records it was computed from; `--shard_index/--num_shards` splits the shards across
machines (shard w goes to machine w % num_shards).

Rerunning is always safe and is how depth is brought up to date: a finished shard is skipped
only if its sidecar matches the current image records (keys and content hashes: it re-reads
and hashes its images, no model run) and the stored model; shards whose images were added,
removed, renamed or edited since (e.g. after a re-import) are recomputed, and with them every
later shard when the record count changed. Another `--records_per_shard`, `--model` or
`--depth_output` than the stored one is refused: resume with the stored value, or pass
`--overwrite` (on every machine) to recompute this machine's share with the new settings.
Whichever run finds every shard current writes the TFDS metadata and the split's fingerprint.
Runs on GPU when torch sees one. A tqdm bar shows rate and ETA.
"""

from __future__ import annotations

import math
import os
import shlex
from collections import defaultdict

import numpy as np
from absl import app, flags, logging
from PIL import Image

from triplane3d.data import depth_format, images, records, sources

# Output kind of each model family's `predicted_depth` (model_type → kind). Depth Anything
# says which in its config. Unknown families need --depth_output rather than a guess: a wrong
# guess inverts the geometry silently.
_OUTPUT_OF_MODEL_TYPE = {
  'zoedepth': 'distance',  # Metric depth.
  'glpn': 'distance',  # Metric depth (NYU / KITTI).
  'dpt': 'disparity',  # MiDaS-style relative inverse depth (DPT-Large / Hybrid / BEiT).
}


class SettingsError(ValueError):
  """A flag is out of range, or disagrees with what the output directory was made with."""


def model_output(config) -> str | None:
  """'distance' or 'disparity': what a depth model's `predicted_depth` is; None if unknown."""
  if config.model_type == 'depth_anything':
    metric = getattr(config, 'depth_estimation_type', 'relative') == 'metric'
    return 'distance' if metric else 'disparity'
  return _OUTPUT_OF_MODEL_TYPE.get(config.model_type)


def _target_size(h: int, w: int, max_side: int) -> tuple[int, int]:
  """Storage size of a depth map: the image's aspect ratio, longer side ≤ max_side."""
  s = min(1.0, max_side / max(h, w))
  return max(1, round(h * s)), max(1, round(w * s))


class DepthModel:
  """A `transformers` depth model + its processor: PIL images → raw depth maps (h, w)."""

  def __init__(self, model: str, device: str | None = None):
    """`model`: a hub name or directory; `.name` and `.config` describe it."""
    import torch  # Heavy, optional dependency: only the precompute tool needs it.
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    self.torch = torch
    self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    self.processor = AutoImageProcessor.from_pretrained(model)
    self.model = AutoModelForDepthEstimation.from_pretrained(model).to(self.device).eval()
    self.name, self.config = model, self.model.config
    # ZoeDepth reflect-pads its input against border artefacts; the padding is cut off again.
    self._zoe_pad = self.model.config.model_type == 'zoedepth' and getattr(
      self.processor, 'do_pad', False
    )

  def _resize(self, depth_hw, source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """The model's output grid → the storage size: bicubic (torch, align_corners=False, no
    antialiasing), straight from the output grid (ZoeDepth: after removing its padding)."""
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


def _shard_records(image_src, model: DepthModel, lo: int, hi: int, batch_size, max_side, bar, seen):
  """Depth records of image records [lo, hi); appends each one's (key, image_hash) to `seen`."""
  for start in range(lo, hi, batch_size):
    batch = [image_src[i] for i in range(start, min(hi, start + batch_size))]
    keys, hashes, pils, sizes, ok = [], [], [], [], []
    for rec in batch:
      keys.append(sources.example_key(rec))
      hashes.append(depth_format.content_hash(rec['image']))
      try:
        im = images.open_rgb(rec['image'])
        pils.append(im)
        sizes.append(_target_size(im.height, im.width, max_side))
        ok.append(True)
      except Exception as err:  # Corrupt image: keep alignment with a placeholder record.
        logging.warning('image %r is unreadable (%s); writing a placeholder depth.', keys[-1], err)
        ok.append(False)
    depths = iter(model(pils, sizes) if pils else [])
    for key, image_hash, good in zip(keys, hashes, ok):
      seen.append((key, image_hash))
      yield depth_format.encode(next(depths) if good else np.ones((1, 1)), key, image_hash)
    bar.update(len(batch))


def _image_entries(image_src, lo: int, hi: int) -> list[tuple[str, str]]:
  out = []
  for i in range(lo, hi):
    rec = image_src[i]
    out.append((sources.example_key(rec), depth_format.content_hash(rec['image'])))
  return out


def _check_int(flag: str, value, lo: int, hi: int | None, what: str) -> None:
  if (
    isinstance(value, bool)
    or not isinstance(value, int)
    or value < lo
    or (hi is not None and value > hi)
  ):
    allowed = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
    raise SettingsError(f'--{flag}={value!r}: must be an integer {allowed} ({what}).')


def _validate(
  records_per_shard, shard_index, num_shards, batch_size, max_side, max_work_shards, depth_output
) -> None:
  _check_int('records_per_shard', records_per_shard, 1, None, 'images per output shard')
  _check_int('num_shards', num_shards, 1, None, 'machines sharing the work')
  _check_int('shard_index', shard_index, 0, num_shards - 1, f'this machine among {num_shards}')
  _check_int('batch_size', batch_size, 1, None, 'images per forward pass')
  _check_int('max_side', max_side, 1, None, 'longer side of stored depth maps, in pixels')
  if max_work_shards is not None:
    _check_int('max_work_shards', max_work_shards, 1, None, 'shards to write in this run')
  if depth_output not in ('auto', *depth_format.OUTPUTS):
    raise SettingsError(
      f"--depth_output={depth_output!r}: must be 'auto' (from the model's config), 'distance' "
      "(larger = farther) or 'disparity' (larger = nearer)."
    )


def _describe(model, depth_output: str) -> dict:
  """{'model', 'model_type', 'output'} of a model name / directory or a loaded DepthModel."""
  if isinstance(model, DepthModel):
    name, config = model.name, model.config
  else:
    from transformers import AutoConfig  # Only the config: cheap, no weights.

    name, config = model, AutoConfig.from_pretrained(model)
  known = model_output(config)
  if depth_output == 'auto':
    if known is None:
      raise SettingsError(
        f'cannot tell whether {name!r} (model_type {config.model_type!r}) predicts distance or '
        'disparity; pass --depth_output=distance (larger = farther) or --depth_output=disparity '
        '(larger = nearer, e.g. relative inverse depth).'
      )
    depth_output = known
  elif known is not None and known != depth_output:
    logging.warning(
      '--depth_output=%s overrides %s, which model_type %r predicts.',
      depth_output,
      known,
      config.model_type,
    )
  return {'model': name, 'model_type': config.model_type, 'output': depth_output}


def _refuse_other_settings(stored: dict, info: dict, where: str) -> None:
  """Raises SettingsError when `stored` (the depth_info on disk) was made with other settings."""
  redo = (
    'or pass --overwrite (on every machine of a multi-machine run) to recompute this split '
    f'with the new value, or delete {where} (all its splits).'
  )
  if stored['images']['name'] != info['images']['name']:
    raise SettingsError(
      f'{where} holds depth for image dataset {stored["images"]["name"]!r}, not '
      f'{info["images"]["name"]!r}: pass another --depth_name, {redo}'
    )
  if stored['records_per_shard'] != info['records_per_shard']:
    raise SettingsError(
      f'{where} was computed with --records_per_shard={stored["records_per_shard"]}, not '
      f'{info["records_per_shard"]}: rerun with --records_per_shard='
      f'{stored["records_per_shard"]} to resume, {redo}'
    )
  for key in ('model', 'output'):
    if stored[key] != info[key]:
      flag = 'model' if key == 'model' else 'depth_output'
      raise SettingsError(
        f'{where} was computed with --{flag}={stored[key]}, not {info[key]} (one split must '
        f'not mix models): rerun with --{flag}={shlex.quote(stored[key])} to resume, {redo}'
      )


def _current(side: dict | None, info: dict, num_records: int) -> bool:
  """Whether a shard sidecar was written with this info's model / output for `num_records`."""
  return (
    side is not None
    and side['num_records'] == num_records
    and all(side[k] == info[k] for k in ('model', 'output'))
  )


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
  depth_output: str = 'auto',
  overwrite: bool = False,
  max_work_shards: int | None = None,
) -> int:
  """Computes this machine's missing or stale depth shards. Returns images processed.

  Args:
    name, split, data_dir: the image dataset.
    model: a `transformers` model name / directory, or a loaded DepthModel.
    depth_name: output dataset name (default NAME_depth), under out_data_dir (default data_dir).
    records_per_shard: images per output file (the unit of resumption and of recomputation).
    shard_index, num_shards: this machine's share of the output files.
    depth_output: 'auto' (from the model's config), 'distance' or 'disparity'.
    overwrite: recompute this machine's share even where current, and replace the stored
      settings (another model or records_per_shard).
    max_work_shards: stop after this many newly written shards (to bound a job's time).

  Raises:
    SettingsError: a value out of range, or settings other than the stored ones (without
      `overwrite`); the message says how to fix it.
  """
  from tqdm import tqdm

  _validate(
    records_per_shard,
    shard_index,
    num_shards,
    batch_size,
    max_side,
    max_work_shards,
    depth_output,
  )
  depth_name = depth_name or f'{name}_depth'
  out_dir = out_data_dir or data_dir
  where = records.dataset_dir(out_dir, depth_name)
  image_src = records.open_split(data_dir, name, split)
  n = len(image_src)
  if n == 0:
    raise SettingsError(f'{name}/{split} in {data_dir!r} has no records: no depth to compute.')
  total = math.ceil(n / records_per_shard)
  bounds = [(w * n // total, (w + 1) * n // total) for w in range(total)]
  info = {
    **_describe(model, depth_output),
    'images': {'name': name, 'split': split, 'num_records': n},
    'records_per_shard': records_per_shard,
    'num_shards': total,
    'max_side': max_side,
  }
  stored = depth_format.read_info(out_dir, depth_name, split)
  if stored is not None and not overwrite:
    _refuse_other_settings(stored, info, where)
  if stored is not None and stored['images'].get('num_records') != n:
    logging.warning(
      '%s/%s now has %d records, its depth was computed for %d: recomputing the shards that '
      'changed.',
      name,
      split,
      n,
      stored['images'].get('num_records'),
    )
  unfinished = stored and {**stored, 'images': {**stored['images'], 'fingerprint': None}}
  if unfinished != {**info, 'images': {**info['images'], 'fingerprint': None}}:
    depth_format.write_info(out_dir, depth_name, split, info)  # Before any shard: resumable.
  records.remove_other_shardings(out_dir, depth_name, split, total)

  def sidecar(w):
    return depth_format.shard_info_path(out_dir, depth_name, split, w, total)

  # A finished shard is current if its sidecar matches the images it is for, now.
  mine, todo, stale = list(range(shard_index, total, num_shards)), [], 0
  for w in mine:
    lo, hi = bounds[w]
    side = depth_format.read_json(sidecar(w))
    done = records.shard_done(out_dir, depth_name, split, w, total)
    if overwrite or not done or not _current(side, info, hi - lo):
      todo.append(w)
    elif side['fingerprint'] != depth_format.shard_fingerprint(_image_entries(image_src, lo, hi)):
      logging.warning('shard %d of %s/%s: its images changed since; recomputing.', w, name, split)
      todo.append(w)
      stale += 1
  logging.info(
    "%s/%s: %d of this machine's %d shards current, %d to compute (%d stale).",
    depth_name,
    split,
    len(mine) - len(todo),
    len(mine),
    len(todo),
    stale,
  )
  todo = todo[:max_work_shards]
  if todo and not isinstance(model, DepthModel):
    model = DepthModel(model)
  count = sum(bounds[w][1] - bounds[w][0] for w in todo)
  feats = depth_format.features()
  with tqdm(total=count, unit='img', desc=f'{depth_name}/{split}', smoothing=0.05) as bar:
    for w in todo:
      lo, hi = bounds[w]
      if os.path.exists(sidecar(w)):
        os.remove(sidecar(w))  # The shard is about to change: never leave a matching sidecar.
      seen = []
      recs = _shard_records(image_src, model, lo, hi, batch_size, max_side, bar, seen)
      written = records.write_shard(out_dir, depth_name, split, feats, recs, w, total)
      if written != hi - lo:  # A guard: an incomplete shard must never count as finished.
        os.remove(records.shard_path(out_dir, depth_name, split, w, total))
        raise RuntimeError(f'shard {w}: wrote {written} records, expected {hi - lo}.')
      side = {k: info[k] for k in ('model', 'model_type', 'output', 'max_side')}
      side.update(num_records=written, fingerprint=depth_format.shard_fingerprint(seen))
      depth_format.write_json(sidecar(w), side)
  _finalize_if_complete(out_dir, depth_name, split, info, bounds)
  return count


def _finalize_if_complete(out_dir, depth_name, split, info, bounds) -> bool:
  """Writes the metadata once every shard of the split is present and was made for these
  settings and record counts. Shards of other machines are not re-hashed here (too costly);
  a stale one among them is still caught by their next run and by training's per-record check.
  """
  total = len(bounds)
  sides = []
  for w, (lo, hi) in enumerate(bounds):
    side = depth_format.read_json(
      depth_format.shard_info_path(out_dir, depth_name, split, w, total)
    )
    if not records.shard_done(out_dir, depth_name, split, w, total) or not _current(
      side, info, hi - lo
    ):
      logging.info('%s/%s: shard %d of %d is not done yet.', depth_name, split, w, total)
      return False
    sides.append(side)
  info = {**info, 'images': {**info['images']}}
  info['images']['fingerprint'] = depth_format.split_fingerprint(s['fingerprint'] for s in sides)
  depth_format.write_info(out_dir, depth_name, split, info)
  records.finalize(
    out_dir,
    depth_name,
    depth_format.features(),
    f'Depth for {info["images"]["name"]} by triplane3d precompute_depth ({info["model"]}, '
    f'{info["output"]}).',
  )
  return True


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
  flags.DEFINE_string(
    'depth_output',
    'auto',
    "What the model predicts: 'auto' (from its config), 'distance' "
    "(larger = farther) or 'disparity' (larger = nearer).",
  )
  flags.DEFINE_bool(
    'overwrite', False, "Recompute this machine's share even where current, with new settings."
  )


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    n = precompute(
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
      depth_output=f.depth_output,
      overwrite=f.overwrite,
    )
  except SettingsError as err:
    raise app.UsageError(str(err)) from err
  print(f'{f.depth_name or f.name + "_depth"}/{f.split}: depth computed for {n} images.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
