"""The evaluation suites and their lookup: `resolve(config, workdir)` → suites to run, in order.

  synthetic   synthetic scenes: shape top-1, novel textures, other sizes, cue-conflict shape bias,
              exact-depth probe (synthetic_suite.py; runs anywhere)
  imagenet    DINOv2 linear probe on imagenet2012, the head then scored unchanged on the
              robustness sets (ImageNet-R, ImageNet-Sketch; each restricted to the classes it has)
              and on PUG:ImageNet and ImageNet-3DCC when configured (robustness.py)
  shape_bias  Geirhos cue-conflict images through the ImageNet head (needs imagenet in the run)
  inat21      DINOv2 linear probe on i_naturalist2021
  nyu_depth   DINOv2's linear depth probe (depth_linear.py; or the ridge probe of
              depth_probe.py) on NYU-Depth v2 from TFDS or a folder (nyu_suite.py)
  all         every suite above

A suite has `name`, `columns` ((key, title, higher is better, 'percent' | 'float') of its
headline metrics), `check()` (dataset lookup; raises before any work), `image_sets()`
([(key, features.ImageSet, with_patches)]), `protocol()` and `evaluate(feats, context)` →
{'metrics', 'details'[, 'baselines', 'arrays']} ('baselines': {metric key: (value of a
trivial predictor, its name)}), where `context` holds the results of the suites before it
for the same backbone (shape_bias reads the ImageNet head from it).
"""

from __future__ import annotations

import numpy as np

from triplane3d.evaluate import datasets, features, linear, probe, robustness, shape_bias
from triplane3d.evaluate.nyu_suite import NyuDepthSuite
from triplane3d.evaluate.synthetic_suite import SyntheticSuite

ORDER = ('synthetic', 'imagenet', 'shape_bias', 'inat21', 'nyu_depth')


class UnknownSuiteError(ValueError):
  """A suite name that is not in ORDER (nor 'all')."""


class ClassificationSuite:
  """Linear probe on a TFDS classification dataset (config section `config[name]`), the head
  scored on `robustness` sets ('dataset:split'), each restricted to the labels it contains,
  and for imagenet on PUG:ImageNet and ImageNet-3DCC when configured (robustness.py)."""

  def __init__(self, name: str, config, workdir: str):
    del workdir
    self.name, self.config, self.c = name, config, config[name]
    self.robustness = [tuple(s.split(':', 1)) for s in self.c.robustness]
    mode = probe.label(probe.settings(config.probe, 1))  # '' or ' (fast: centre crops)'.
    self.columns = [('top1', f'{name} top-1{mode}', True, 'percent')] + [
      (f'{ds}_top1', f'{ds} top-1', True, 'percent') for ds, _ in self.robustness
    ]
    self.readers = robustness.readers(config) if name == 'imagenet' else []
    self.columns += [col for r in self.readers for col in r.columns]
    self.sets: dict = {}

  def check(self) -> None:
    c, s = self.c, int(self.config.img_size)
    found = datasets.find_all(
      self.config.data_dir,
      [(c.dataset, [c.train_split, c.val_split])] + [(ds, [sp]) for ds, sp in self.robustness],
    )
    b = found[c.dataset]
    self.train = datasets.TfdsImages(
      f'{c.dataset}_{c.train_split}', b, c.train_split, s, c.max_train
    )
    self.sets = {
      **probe.train_sets('train', self.train, self._probe()),
      'val': datasets.TfdsImages(f'{c.dataset}_{c.val_split}', b, c.val_split, s, c.max_val),
    }
    for ds, split in self.robustness:
      self.sets[ds] = datasets.TfdsImages(f'{ds}_{split}', found[ds], split, s)
    problems = []  # Every missing folder dataset in one message, as find_all does.
    for reader in self.readers:
      try:
        self.sets.update(reader.sets(self.config.data_dir, s))
      except datasets.DatasetMissingError as e:
        problems.append(str(e))
    if problems:
      raise datasets.DatasetMissingError('\n  '.join(problems))

  def _probe(self) -> dict:
    return probe.settings(self.config.probe, len(self.train))

  def image_sets(self):
    return [(k, v, False) for k, v in self.sets.items()]

  def protocol(self) -> dict:
    return {
      'img_size': int(self.config.img_size),
      'sets': {k: v.identity for k, v in self.sets.items()},
      'num_classes': int(self.c.num_classes),
      'probe': self._probe(),
      'pug_imagenet': self.config.pug_imagenet.to_dict() if self.readers else None,
      'imagenet_3dcc': self.config.imagenet_3dcc.to_dict() if self.readers else None,
    }

  def evaluate(self, feats, context: dict) -> dict:
    del context
    grid = probe.fit(feats, self._probe(), int(self.c.num_classes))
    head, variant = grid['head'], grid['variant']
    metrics = {'top1': grid['accuracy']}
    for ds, _ in self.robustness:
      y = feats[ds]['meta_label']
      subset = np.unique(y) if len(np.unique(y)) < int(self.c.num_classes) else None
      x = features.variants(feats[ds])[variant]
      metrics[f'{ds}_top1'] = linear.score(head, x, y, class_subset=subset)
    details = {'probe': {'variant': variant, 'lr': grid['lr'], 'table': _str_keys(grid['table'])}}
    for reader in self.readers:
      m, d = reader.score(head, variant, feats)
      metrics.update(m)
      details[type(reader).__name__.lower()] = d
    return {'metrics': metrics, 'details': details, 'arrays': {'w': head['w'], 'b': head['b']}}


class ShapeBiasSuite:
  """Cue-conflict shape bias (shape_bias.py) of the ImageNet head on `config.shape_bias`."""

  name = 'shape_bias'
  columns = (('shape_bias', 'cue-conflict shape bias', True, 'percent'),)

  def __init__(self, config, workdir: str):
    del workdir
    self.config, self.c = config, config.shape_bias
    self.sets: dict = {}

  def check(self) -> None:
    c = self.c
    b = datasets.find(self.config.data_dir, c.dataset, [c.split])
    self.sets = {
      'cue_conflict': datasets.TfdsImages(c.dataset, b, c.split, int(self.config.img_size))
    }

  def image_sets(self):
    return [('cue_conflict', self.sets['cue_conflict'], False)]

  def protocol(self) -> dict:
    return {
      'img_size': int(self.config.img_size),
      'set': self.sets['cue_conflict'].identity,
      'decision': "ImageNet head softmax, mean over each category's classes, argmax of 16",
    }

  def evaluate(self, feats: dict, context: dict) -> dict:
    imagenet = context['imagenet']
    variant = imagenet['details']['probe']['variant']
    x = features.variants(feats['cue_conflict'])[variant]
    logits = x @ imagenet['arrays']['w'] + imagenet['arrays']['b']
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    decisions = np.argmax(shape_bias.imagenet_to_16(probs), axis=1)
    r = shape_bias.shape_bias(feats['cue_conflict']['meta_file_name'], decisions)
    return {'metrics': {'shape_bias': r['shape_bias']}, 'details': {'cue_conflict': r}}


def _str_keys(table: dict) -> dict:
  return {v: {str(lr): a for lr, a in t.items()} for v, t in table.items()}


def _names(spec) -> list[str]:
  items = [spec] if isinstance(spec, str) else list(spec)
  return [s.strip() for item in items for s in str(item).split(',') if s.strip()]


def resolve(config, workdir: str) -> list:
  """The suites `config.suites` names ('a,b' or 'all'), in ORDER; raises UnknownSuiteError."""
  names = _names(config.suites)
  known = (*ORDER, 'all')
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise UnknownSuiteError(
      f'unknown suite(s) {unknown or names}; pass --config.suites with one or more of '
      f'{", ".join(known)} (comma-separated), or a config from configs/eval/.'
    )
  wanted = set(ORDER) if 'all' in names else set(names)
  if 'shape_bias' in wanted and 'imagenet' not in wanted:
    raise UnknownSuiteError(
      'suite shape_bias reads the ImageNet linear head, so it needs the imagenet suite in the '
      'same run: pass --config.suites=imagenet,shape_bias (cached ImageNet features and probes '
      'in the same --workdir are reused).'
    )
  make = {
    'synthetic': lambda: SyntheticSuite(config, workdir),
    'imagenet': lambda: ClassificationSuite('imagenet', config, workdir),
    'shape_bias': lambda: ShapeBiasSuite(config, workdir),
    'inat21': lambda: ClassificationSuite('inat21', config, workdir),
    'nyu_depth': lambda: NyuDepthSuite(config, workdir),
  }
  return [make[n]() for n in ORDER if n in wanted]
