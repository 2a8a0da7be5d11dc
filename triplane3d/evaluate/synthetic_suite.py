"""The synthetic suite: shape recognition, robustness, cue-conflict shape bias and exact depth,
on synthetic scenes (`triplane3d.data.synthetic`), so it runs anywhere (and in CI, tiny).

Classes are the 5 object shapes. The generator ties texture k to shape k ('class' mode); the
probe's training set ties them only partly: each base scene keeps its class's texture with
probability `texture_class_prob` (default 0.8) and gets a texture drawn independently of the
class otherwise. Texture is then a useful but imperfect cue (alone it gives 0.8 + 0.2/5 = 84%
top-1), shape a perfect one, and the linear probe (DINOv2's grid, `evaluate.linear`) leans on
whichever the frozen features make easier to read. The sets (disjoint seeds, far from the
seed 0 that the demo trains on; all at size `train_size` unless said):

  train, val     the probe's training set and the set that picks its head (variant × lr)
  test           in distribution: top-1
  texture        novel textures (our small PUG-Texture): each base scene rendered with each of
                 the 5 textures (`variation='texture'`), 4 of 5 not its class's own: top-1
  size           other sizes (our small PUG-Size): base scenes re-rendered at the sizes the
                 training set never shows (`variation='size'`): top-1
  conflict       cue conflict: the shape of class k with the texture the training set ties to
                 another class (`texture_mode='conflict'`): shape bias = shape decisions /
                 (shape + texture decisions), also per class (by shape)
  depth_*        scenes of any size and texture with their exact depth (the ray caster's
                 distance along each unit ray, in [near, far]): the per-patch linear depth probe
                 of `depth_probe` (fit on depth_train, α chosen on depth_val, RMSE on
                 depth_test) beside the trivial predictors

Images are rendered at the evaluation size S directly (S a multiple of 14) and cached in
`<workdir>/data/` with their labels, so every backbone sees the same pixels.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tqdm.auto import tqdm

from triplane3d.data import synthetic
from triplane3d.evaluate import depth_probe, features, linear, probe
from triplane3d.render.camera import Camera

NUM_CLASSES = len(synthetic.SHAPES)
SIZE_NAMES = tuple(synthetic.SIZES)


@dataclasses.dataclass
class SceneSet:
  """One synthetic image set (`features.ImageSet`): rendered on first use, cached on disk."""

  name: str
  seed: int
  count: int
  img_size: int
  cache_dir: str
  texture: str = 'mixed'  # 'mixed' (class texture w.p. tied, else random), 'random', 'conflict'
  tied: float = 0.0
  variation: str | None = None  # None, 'texture', 'size'.
  sizes: tuple[int, ...] | None = None  # Allowed size labels; None: any.
  depth_sub: int = 0  # > 0: also depth, `depth_sub` values per patch side.
  _data: dict | None = None

  @property
  def identity(self) -> dict:
    keep = ('seed', 'count', 'img_size', 'texture', 'tied', 'variation', 'sizes', 'depth_sub')
    return {
      'generator': 'triplane3d.data.synthetic',
      'camera': vars(Camera()),
      **{k: getattr(self, k) for k in keep},
    }

  def __len__(self) -> int:
    return self.count

  def _scenes(self):
    """The first `count` scene parameter dicts that pass the filters, in index order."""
    scenes, index = [], 0
    while len(scenes) < self.count:
      # 'mixed': one draw per base scene, so all its renders share the decision.
      scene = synthetic.sample_scene(
        index,
        self.seed,
        texture_mode=self.texture,
        variation=self.variation,
        texture_class_prob=self.tied,
      )
      if self.sizes is None or scene['labels']['size_label'] in self.sizes:
        scenes.append(scene)
      index += 1
    return scenes

  def _render(self) -> dict:
    camera, s = Camera(), self.img_size
    images = np.zeros((self.count, s, s, 3), np.uint8)
    labels: dict[str, list] = {}
    depth = []
    px = 14 // self.depth_sub if self.depth_sub else 0
    for i, scene in enumerate(tqdm(self._scenes(), desc=f'render {self.name}', unit='img')):
      images[i], d = synthetic.render(scene, camera, s)
      for k, v in scene['labels'].items():
        labels.setdefault(k, []).append(v)
      if px:  # The mean over each px×px block: depth_sub values per patch side.
        depth.append(d.reshape(s // px, px, s // px, px).mean(axis=(1, 3)).astype(np.float32))
    data = {'images': images, **{k: np.asarray(v, np.int64) for k, v in labels.items()}}
    if px:
      data['depth'] = np.stack(depth)
    return data

  def _load(self) -> dict:
    if self._data is None:
      path = os.path.join(self.cache_dir, f'{self.name}-{features.cache_key(self.identity)}.npz')
      if os.path.exists(path):
        with np.load(path) as f:
          self._data = {k: f[k] for k in f.files}
      else:
        self._data = self._render()
        features.save_npz(path, self._data)
    return self._data

  def meta(self) -> dict[str, np.ndarray]:
    return {k: v for k, v in self._load().items() if k != 'images'}

  def images(self, start: int, stop: int) -> np.ndarray:
    return self._load()['images'][start:stop]


COLUMNS = (
  # (key, title, higher is better, format)
  ('test_top1', 'synthetic top-1', True, 'percent'),
  ('texture_top1', 'novel texture top-1', True, 'percent'),
  ('size_top1', 'other size top-1', True, 'percent'),
  ('shape_bias', 'shape bias', True, 'percent'),
  ('depth_rmse', 'depth RMSE', False, 'float'),
)


class SyntheticSuite:
  """See the module docstring. `config` is the eval config (sections `synthetic`, `probe`)."""

  name = 'synthetic'

  def __init__(self, config, workdir: str):
    c = config.synthetic
    size = str(c.train_size)
    if size not in SIZE_NAMES:
      raise ValueError(
        f'synthetic.train_size must be one of {SIZE_NAMES}, got {size!r}: the other sizes form '
        'the size-shift set.'
      )
    s = int(config.img_size)
    if s % 14 or int(c.depth_sub) not in (1, 2, 7, 14):
      raise ValueError(
        f'img_size must be a multiple of 14 and synthetic.depth_sub one of 1, 2, 7, 14 (they tile '
        f'a 14-pixel patch), got img_size={s}, depth_sub={c.depth_sub}.'
      )
    self.config = config
    mode = probe.label(probe.settings(config.probe, 1, fast_label=probe.FAST_SCENES))
    self.columns = [(COLUMNS[0][0], COLUMNS[0][1] + mode, *COLUMNS[0][2:]), *COLUMNS[1:]]
    train = (SIZE_NAMES.index(size),)
    other = tuple(i for i in range(len(SIZE_NAMES)) if i not in train)
    cache = os.path.join(workdir, 'data')
    seed, tied = int(c.seed), float(c.texture_class_prob)

    def scene_set(name, k, count, **kw):
      return SceneSet(f'synthetic_{name}', seed + k, int(count), s, cache, **kw)

    self.sets = {
      'train': scene_set('train', 0, c.num_train, tied=tied, sizes=train),
      'val': scene_set('val', 1, c.num_val, tied=tied, sizes=train),
      'test': scene_set('test', 2, c.num_test, tied=tied, sizes=train),
      'texture': scene_set(
        'texture', 3, c.num_shift, texture='random', variation='texture', sizes=train
      ),
      'size': scene_set('size', 4, c.num_shift, tied=tied, variation='size', sizes=other),
      'conflict': scene_set('conflict', 5, c.num_shift, texture='conflict', sizes=train),
    }
    depth = {'texture': 'random', 'depth_sub': int(c.depth_sub)}
    for k, (name, count) in enumerate(
      [('depth_train', c.num_depth_train), ('depth_val', c.num_val), ('depth_test', c.num_test)]
    ):
      self.sets[name] = scene_set(name, 6 + k, count, **depth)

  def check(self) -> None:
    """Nothing to look up: every image is generated."""

  def _probe(self, num_train: int) -> dict:
    c = self.config.synthetic
    return probe.settings(
      self.config.probe, num_train, c.probe_epochs, c.probe_batch_size, probe.FAST_SCENES
    )

  def image_sets(self):
    """[(key, ImageSet, with_patches)] this suite needs features of (the probe's training set
    replaced by its augmented view sets when probe.augment)."""
    sets = {**probe.train_sets('train', self.sets['train'], self._probe(self.sets['train'].count))}
    sets.update({k: v for k, v in self.sets.items() if k != 'train'})
    return [(k, v, k.startswith('depth_')) for k, v in sets.items()]

  def protocol(self) -> dict:
    c = self.config.synthetic
    return {
      'img_size': int(self.config.img_size),
      'classes': list(synthetic.SHAPES),
      'texture_class_prob': float(c.texture_class_prob),
      'train_size': str(c.train_size),
      'sets': {k: {'count': v.count, 'seed': v.seed} for k, v in self.sets.items()},
      'probe': self._probe(int(c.num_train)),
      'depth_probe_version': depth_probe.VERSION,
    }

  def evaluate(self, feats: dict[str, dict], context: dict | None = None) -> dict:
    """Metrics from the features of every set (keys of `self.sets`)."""
    del context  # Needs no other suite.
    grid = probe.fit(feats, self._probe(self.sets['train'].count), NUM_CLASSES)
    label = {k: feats[k]['meta_label'] for k in ('test', 'texture', 'size', 'conflict')}
    head, variant = grid['head'], grid['variant']

    def x(key):
      return features.variants(feats[key])[variant]

    top1 = {k: linear.score(head, x(k), label[k]) for k in ('test', 'texture', 'size')}
    pred = linear.predict(head['w'][None], head['b'][None], x('conflict'))[0]
    bias = cue_conflict(pred, label['conflict'], feats['conflict']['meta_texture_label'])
    depth = depth_probe.evaluate(feats['depth_train'], feats['depth_val'], feats['depth_test'])
    return {
      'metrics': {
        'test_top1': top1['test'],
        'texture_top1': top1['texture'],
        'size_top1': top1['size'],
        'shape_bias': bias['shape_bias'],
        'depth_rmse': depth['rmse'],
      },
      # Trivial predictors' values of the same metrics: (value, name), drawn in the figures.
      'baselines': {
        **{k: (1.0 / NUM_CLASSES, 'chance') for k in ('test_top1', 'texture_top1', 'size_top1')},
        'depth_rmse': (depth['baselines']['mean_map']['rmse'], 'mean map'),
      },
      'details': {
        'probe': {
          'variant': variant,
          'lr': grid['lr'],
          'val_top1': grid['accuracy'],
          'val_top1_table': {
            v: {str(lr): a for lr, a in t.items()} for v, t in grid['table'].items()
          },
        },
        'cue_conflict': bias,
        'depth': depth,
        'chance_top1': 1.0 / NUM_CLASSES,
      },
    }


def cue_conflict(pred, shape, texture) -> dict:
  """Shape bias of predictions on cue-conflict images (texture class k = class k's texture)."""
  pred, shape, texture = (np.asarray(a) for a in (pred, shape, texture))
  if np.any(shape == texture):
    raise ValueError('cue-conflict images must have a texture of another class than their shape.')

  def ratio(mask):
    s, t = int(np.sum((pred == shape) & mask)), int(np.sum((pred == texture) & mask))
    return (s / (s + t) if s + t else float('nan')), s, t

  bias, s, t = ratio(np.ones(len(pred), bool))
  return {
    'shape_bias': bias,
    'shape_hits': s,
    'texture_hits': t,
    'num_images': len(pred),
    'per_class': {name: ratio(shape == k)[0] for k, name in enumerate(synthetic.SHAPES)},
  }
