"""The grain input pipeline: joined image + depth records → augmented per-host batches.

`prepare(config)` makes the data ready once (generates synthetic scenes if missing, opens the
datasets, checks their alignment, counts); `create(config, data)` builds an iterator over it:

  source (ImageDepthSource, optionally a fixed random Subset)
    → shuffle(seed), reshuffled every epoch → repeat forever
    → DecodeAugment (random_map: crop/flip drawn from the *global* index, so augmentation does
      not depend on the number of hosts) → this host's contiguous block of each global batch
      (`HostBlocks`)
    → batch(global_batch // process_count) → worker processes (mp_prefetch)
    → (tfds sources) a look at the first batches' depth targets: a warning when many pixels
      sit at camera.near / far, i.e. the depth rule clips them (`_ClipWatch`)

Shuffling before sharding means each epoch every host sees a different 1/process_count of the
data, and together the hosts see each example exactly once per epoch. The returned iterator is
a grain `DatasetIterator`: its `get_state()` / `set_state()` round-trip through
`grain.checkpoint.CheckpointSave/CheckpointRestore` (orbax), and a restored iterator continues
with the very next batch. `sharding.to_global` turns a host's numpy batch into globally
sharded `jax.Array`s.

Whether the stored depth is distance or disparity comes from the depth dataset
(`depth_info` 'output', written by `precompute_depth`) unless `depth.is_disparity` is set:
`depth_is_disparity`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from triplane3d.data import depth_format, sources, synthetic, transforms
from triplane3d.render.camera import Camera

# `_ClipWatch`: how many first batches it looks at, and the clipped fraction that warns. The
# percentile rule clips lo_percentile + (100 - hi_percentile) = 4 % by design.
_CLIP_CHECK_BATCHES = 4
_CLIP_WARN_FRACTION = 0.2

_WARNED: set[str] = set()  # Messages `_warn_once` has logged in this process.


def _warn_once(message: str) -> None:
  if message not in _WARNED:
    _WARNED.add(message)
    logging.warning('%s', message)


class HostBlocks(grain.MapDataset):
  """This host's contiguous block of every global batch.

  Global batch j is elements [j·G, (j+1)·G) of the parent; host p of P takes
  [j·G + p·b, j·G + (p+1)·b) with b = G / P. Concatenating the hosts' batches in process order
  (what `sharding.to_global` does) therefore rebuilds exactly the single-process batch, element for
  element, so per-example randomness keyed by batch position (ray subsets, jitter) and hence
  the losses do not depend on the number of hosts.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, block: int, count: int):
    super().__init__(parent)
    self._g, self._b, self._p = global_batch, global_batch // count, block

  def __len__(self) -> int:
    return len(self._parent) // self._g * self._b

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    j, t = divmod(i, self._b)
    return self._parent[j * self._g + self._p * self._b + t]


def _names(config: mlc.ConfigDict) -> tuple[str, str, str, str]:
  """(data_dir, image dataset name, depth dataset name, split) of `config.data`; reads and
  writes nothing."""
  d = config.data
  if d.source == 'tfds':
    # Unset: the name precompute_depth writes by default for this image dataset.
    return d.data_dir, d.name, d.depth_name or f'{d.name}_depth', d.split
  if d.source != 'synthetic':
    raise ValueError(f"unknown data.source {d.source!r}: 'tfds' or 'synthetic'.")
  data_dir = d.data_dir or (os.path.join(config.workdir, 'data') if config.workdir else '')
  if not data_dir:
    raise ValueError("data.source='synthetic' needs data.data_dir (or workdir) to write into.")
  if d.num_synthetic <= 0:
    raise ValueError("data.source='synthetic' needs data.num_synthetic > 0.")
  return data_dir, synthetic.NAME, synthetic.DEPTH_NAME, 'train'


@dataclasses.dataclass(frozen=True)
class Data:
  """The training examples, prepared once (`prepare`) and reused by every `create`.

  Attributes:
    source: the joined image + depth source, checked for alignment (a fixed random
      `sources.Subset` of it when `data.subset_size` > 0); random access, picklable.
  """

  source: Any

  @property
  def num_examples(self) -> int:
    """Examples per epoch (the subset size when training on a subset); global, all hosts."""
    return len(self.source)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Optimizer steps in one epoch at the global `batch_size` (partial batches dropped)."""
    return self.num_examples // batch_size


def synthetic_options(config: mlc.ConfigDict) -> dict:
  """`synthetic.sample_scene`'s texture options for `config.data` (the synthetic source)."""
  p = float(config.data.synthetic_texture_prob)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'data.synthetic_texture_prob must be in [0, 1], got {p}.')
  return (
    {'texture_mode': 'class'} if p == 1.0 else {'texture_mode': 'mixed', 'texture_class_prob': p}
  )


def synthetic_depth_options(config: mlc.ConfigDict) -> dict:
  """`synthetic.example`'s depth degradation for `config.data`, in generated-image units: the
  config gives the blur in pixels of the renderer's targets (`render.resolution`) and the
  noise per target pixel, so both reach the loss as configured after the resize."""
  blur, noise = float(config.data.synthetic_depth_blur), float(config.data.synthetic_depth_noise)
  if blur < 0 or noise < 0:
    raise ValueError(
      f'data.synthetic_depth_blur and synthetic_depth_noise must be >= 0, got {blur}, {noise}.'
    )
  r = int(config.render.resolution)
  side = synthetic.default_resolution(r, config.model.img_size)
  return {'depth_blur': blur * side / r, 'depth_noise': noise, 'noise_cells': r if noise else 0}


def prepare(config: mlc.ConfigDict) -> Data:
  """Makes the training data ready, once: generates the synthetic scenes if they are missing
  (`synthetic.ensure_dataset`, idempotent), opens the image and depth datasets, checks that
  they belong together (`check_alignment`) and takes the subset. Every process calls it.
  """
  data_dir, name, depth_name, split = _names(config)
  if config.data.source == 'synthetic':
    synthetic.ensure_dataset(
      data_dir,
      num_examples=config.data.num_synthetic,
      seed=config.seed,
      camera=Camera.from_config(config.camera),
      resolution=synthetic.default_resolution(config.render.resolution, config.model.img_size),
      **synthetic_options(config),
      **synthetic_depth_options(config),
    )
  src = sources.ImageDepthSource(data_dir, name, depth_name, split)
  if src.info is None and config.data.source == 'tfds':
    _warn_once(
      f'depth dataset {depth_name!r} has no depth_info-{split}.json (made by an older '
      'precompute_depth, or another tool): edited images are not detected and its depth kind '
      f'is unknown. Bring it up to date: {sources.update_command(*_names(config), None)}'
    )
  src.check_alignment()
  if config.data.subset_size > 0:
    src = sources.Subset(src, config.data.subset_size, seed=config.seed)
  return Data(src)


def _stored_output(config: mlc.ConfigDict) -> tuple[str | None, str]:
  """(the depth dataset's 'distance' / 'disparity' or None if unrecorded, a description)."""
  if config.data.source == 'synthetic':
    return 'distance', 'the synthetic scenes (exact distance)'
  data_dir, _, depth_name, split = _names(config)
  info = depth_format.read_info(data_dir, depth_name, split)
  if info is None:
    return None, f'depth dataset {depth_name!r}'
  return info['output'], f'depth dataset {depth_name!r} ({info["output"]} from {info["model"]})'


def depth_is_disparity(config: mlc.ConfigDict) -> bool:
  """Whether the stored depth is disparity (larger = nearer), so `map_depth` negates it.

  `depth.is_disparity` when set; when None (the default), what the depth dataset records
  (`depth_format` `depth_info` 'output'). A dataset that records nothing (made by an older
  precompute_depth) is taken as distance, with a warning.
  """
  explicit = config.depth.is_disparity
  stored, what = _stored_output(config)
  if explicit is None:
    if stored is None:
      _warn_once(
        f'{what} does not record whether it holds distance or disparity; assuming distance. '
        'Set depth.is_disparity, or rerun precompute_depth to record it.'
      )
    return stored == 'disparity'
  if stored is not None and bool(explicit) != (stored == 'disparity'):
    _warn_once(
      f'depth.is_disparity={explicit} overrides {what}: the geometry is inverted unless the '
      'dataset is mislabelled. Leave depth.is_disparity unset (None) to follow the dataset.'
    )
  return bool(explicit)


def augmentation(
  config: mlc.ConfigDict, *, whole_image: bool = False, float_pixels: bool = True
) -> transforms.DecodeAugment:
  """The per-example transform `create` uses, built from `config`.

  `whole_image=True`: no crop and no flip (evaluation), everything else the same.
  `float_pixels=False`: 'image' and 'rgb' stay uint8 (`transforms.DecodeAugment`).
  """
  camera = Camera.from_config(config.camera)
  is_disparity = depth_is_disparity(config)
  if is_disparity and config.depth.normalize == 'none':
    raise ValueError(
      f"depth.normalize='none' needs metric distance, but {_stored_output(config)[1]} is "
      "disparity (or depth.is_disparity=True): set depth.normalize='percentile' or 'minmax'."
    )
  return transforms.DecodeAugment(
    img_size=config.model.img_size,
    resolution=config.render.resolution,
    crop_scale=(1.0, 1.0) if whole_image else tuple(config.data.crop_scale),
    crop_ratio=(1.0, 1.0) if whole_image else tuple(config.data.crop_ratio),
    flip=config.data.flip and not whole_image,
    near=camera.near,
    far=camera.far,
    depth_rule=config.depth.normalize,
    lo_percentile=config.depth.lo_percentile,
    hi_percentile=config.depth.hi_percentile,
    is_disparity=is_disparity,
    max_bad_fraction=config.data.max_bad_fraction,
    float_pixels=float_pixels,
  )


class _ClipWatch(grain.transforms.Map):
  """Passes batches through; warns once when, over the first few batches, more than
  `_CLIP_WARN_FRACTION` of the depth target pixels sit exactly at near or far.

  Such pixels were clipped by the depth rule (e.g. `depth.normalize='none'` on model depth in
  metres: the targets become mostly flat planes). Used for tfds sources only: synthetic scenes
  have exact depth whose background lies at `far` by construction.
  """

  def __init__(self, near: float, far: float, rule: str):
    self.near, self.far, self.rule = near, far, rule
    self.batches = self.clipped = self.total = 0

  def map(self, batch: dict) -> dict:
    if self.batches < _CLIP_CHECK_BATCHES:
      self.batches += 1
      d = np.asarray(batch['depth'])
      self.clipped += int(np.count_nonzero((d <= self.near) | (d >= self.far)))
      self.total += d.size
      fraction = self.clipped / max(self.total, 1)
      if fraction > _CLIP_WARN_FRACTION:
        self.batches = _CLIP_CHECK_BATCHES  # Once.
        logging.warning(
          '%.0f%% of the depth target pixels in the first batches are clipped to camera.near '
          '/ far = %g / %g by depth.normalize=%r: the stored depth does not fit that range '
          "under this rule. Model depth needs depth.normalize='percentile' (default) or "
          "'minmax'; 'none' suits only metric depth already inside [near, far].",
          100 * fraction,
          self.near,
          self.far,
          self.rule,
        )
    return batch


def create(
  config: mlc.ConfigDict,
  data: Data,
  *,
  block=None,
  process_count=None,
  seed=None,
  float_pixels: bool = True,
):
  """An endless, checkpointable iterator over this host's training batches.

  Data sources (`config.data`):
    source='tfds': images from the TFDS ArrayRecord dataset `data.name` (e.g. imagenet2012,
      or one made by `import_folder`), depth from `data.depth_name` (made by
      `precompute_depth`), both under `data.data_dir` ('' = the TFDS default), split
      `data.split`.
    source='synthetic': `data.num_synthetic` scenes (seed `config.seed`), generated by
      `prepare` into `data.data_dir` (empty: `<workdir>/data`) as the datasets
      `synthetic_scenes` and `synthetic_scenes_depth`, split 'train', in the same formats;
      `data.name`, `data.depth_name` and `data.split` are ignored. The stored depth is exact
      scene depth, so `depth.normalize='none'` keeps the true geometry.

  Args:
    config: the experiment config (`data`, `depth`, `camera`, `model.img_size`,
      `render.resolution`, `train.batch_size`, `seed`).
    data: `prepare(config)`, made once and shared by every iterator.
    block, process_count: this host's share (default: jax.process_index/count()): `block`
      is the block of each global batch the host reads; pass `sharding.host_block(mesh,
      batch)` so rows land where the mesh puts this host's devices. The global batch must
      split evenly over the hosts (`sharding.check_batch`).
    seed: shuffling / augmentation seed (default: `config.seed`).
    float_pixels: False gives 'image' and 'rgb' as the uint8 pixels they are made from, (b, S,
      S, 3) and (b, R, R, 3): 0.61 instead of 1.65 MB per paper-sized example to copy out of
      the workers and onto the devices. `transforms.float_pixels` (jitted, on the devices:
      the trainer does so) turns such a batch into the layout below.

  Returns:
    A grain DatasetIterator; `next()` gives a dict of numpy arrays with b =
    train.batch_size // process_count:
      'image' (b, S, S, 3) float32, ImageNet-normalised, S = model.img_size;
      'rgb'   (b, R, R, 3) float32 in [0, 1], R = render.resolution;
      'depth' (b, R, R, 1) float32 in [camera.near, camera.far];
      'label' (b,) int32.
    It has get_state() / set_state() for checkpointing and never ends (epochs repeat; see
    `Data.num_examples` / `Data.steps_per_epoch` for epoch accounting).
  """
  block = jax.process_index() if block is None else block
  pc = jax.process_count() if process_count is None else process_count
  seed = config.seed if seed is None else seed
  ds = grain.MapDataset.source(data.source)
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(augmentation(config, float_pixels=float_pixels), seed=seed + 1)
  ds = HostBlocks(ds, config.train.batch_size, block, pc)
  workers = config.data.num_workers
  # Threads decode in parallel even in-process: PIL releases the GIL while decoding/resizing.
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=2 if workers else 4, prefetch_buffer_size=16)
  )
  ds = ds.batch(config.train.batch_size // pc, drop_remainder=True)
  if workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=config.data.prefetch)
    )
  if config.data.source == 'tfds':
    camera = Camera.from_config(config.camera)
    ds = ds.map(_ClipWatch(camera.near, camera.far, config.depth.normalize))  # Main process.
  return iter(ds)
