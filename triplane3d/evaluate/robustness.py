"""PUG:ImageNet and ImageNet-3DCC: folder datasets scored with the ImageNet linear head.

Both are image folders imported as TFDS ArrayRecord datasets by `triplane3d.data.import_folder`
(labels = the sorted class-folder names, kept as the dataset's ClassLabel names), one split per
factor / corruption level (docs/evaluation.md has the commands). Each reader has `columns`,
`sets(data_dir, img_size)` → {set key: datasets.TfdsImages} (raising DatasetMissingError before
any work) and `score(head, variant, feats)` → (metrics, details); feats[key] holds a set's
features and 'meta_label' (N,) indices into its class names.

PUG:ImageNet (facebookresearch/PUG; config section `pug_imagenet`): 151 classes rendered with
one factor varied per folder; `splits` names the imported factors, by default 'texture'
(Object_Texture) and 'size' (Object_Scale). Class names map to ImageNet indices through PUG's
`class_to_imagenet_idx.json` (package data, provenance in third_party/PUG/), inverted as PUG's
notebook does (keys sorted; a later class overwrites an earlier one: 841 means Sweatshirt, so
Shirt images are never right). The prediction is the argmax over the 176 mapped ImageNet logits
(`restrict`, docs/evaluation.md: datasets with a class subset restrict the logits to it) or over all 1000
(PUG's notebook); top-1 = the predicted index maps to the image's class. Preprocessing: PUG's
(`CenterCrop(256)`, then resize to S).

ImageNet-3DCC (EPFL-VILAB/3DCommonCorruptions; section `imagenet_3dcc`): ImageNet validation
images under 12 corruptions × 5 severities, assumed laid out as ImageNet-C is,
`<corruption>/<severity>/<wnid>/<image>`, each level imported as split `<corruption>_<severity>`.
Class folders must be WordNet ids; they map to ImageNet indices through TFDS's imagenet2012
label list (sorted wnids). Top-1 over the 1000 classes per level; per corruption the mean over
its severities; the headline is the mean over corruptions.
"""

from __future__ import annotations

import functools
import json
import os
import re
from importlib import resources

import numpy as np
import tensorflow_datasets as tfds

from triplane3d.evaluate import datasets, features, linear

CORRUPTIONS_3DCC = (
  'near_focus',
  'far_focus',
  'fog_3d',
  'flash',
  'color_quant',
  'low_light',
  'xy_motion_blur',
  'z_motion_blur',
  'iso_noise',
  'bit_error',
  'h265_abr',
  'h265_crf',
)  # fmt: skip  (tools/download_imagenet_3dcc.sh)
PUG_FACTORS = {'texture': 'Object_Texture', 'size': 'Object_Scale'}  # Split → PUG's folder.
_PUG_TABLE = 'pug_imagenet_class_to_imagenet_idx.json'
_WNID = re.compile(r'n\d{8}')


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ImageNet-1k WordNet ids in class-index order (TFDS imagenet2012's label file)."""
  path = os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012', 'labels.txt')
  with open(path) as f:
    wnids = tuple(f.read().split())
  if len(wnids) != 1000:
    raise ValueError(f'{path} lists {len(wnids)} ImageNet classes, not 1000: reinstall tfds.')
  return wnids


def load_pug_mapping(path: str = '') -> dict[str, tuple[int, ...]]:
  """PUG class name → ImageNet indices, sorted by name; '' reads the package's copy."""
  if path:
    with open(os.path.expanduser(path)) as f:
      table = json.load(f)
  else:
    text = resources.files('triplane3d.evaluate').joinpath('data', _PUG_TABLE).read_text()
    table = json.loads(text)
  return {k: tuple(int(i) for i in table[k]) for k in sorted(table)}


def _check_names(name: str, names, known, what: str, fix: str) -> None:
  if names is None:
    raise datasets.DatasetMissingError(
      f'dataset {name!r} has no class names (label feature without names): {fix}'
    )
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise datasets.DatasetMissingError(
      f'dataset {name!r} has class folders that are not {what}: {unknown[:5]}'
      f'{" ..." if len(unknown) > 5 else ""}; {fix}'
    )


class Pug:
  """PUG:ImageNet factors (module docstring); `config.pug_imagenet`."""

  def __init__(self, c):
    self.c = c
    self.splits = [str(s) for s in c.splits]
    self.mapping = load_pug_mapping(str(c.mapping))
    self.inverse = {i: name for name, idx in self.mapping.items() for i in idx}  # Last wins.
    self.columns = [(f'pug_{s}_top1', f'PUG-{s} top-1', True, 'percent') for s in self.splits]

  def sets(self, data_dir: str, img_size: int) -> dict:
    b = datasets.find(data_dir, self.c.dataset, self.splits, how_to='pug_imagenet')
    out = {}
    for s in self.splits:
      ts = datasets.TfdsImages(f'{self.c.dataset}_{s}', b, s, img_size, preprocess='pug')
      _check_names(
        self.c.dataset, ts.label_names(), self.mapping, 'PUG:ImageNet classes',
        'import the PUG_ImageNet/<factor> folders unchanged, or pass '
        '--config.pug_imagenet.mapping=JSON naming their classes.',
      )  # fmt: skip
      out[f'pug_{s}'] = ts
    self.names = {s: out[f'pug_{s}'].label_names() for s in self.splits}
    return out

  def score(self, head: dict, variant: str, feats) -> tuple[dict, dict]:
    subset = sorted(self.inverse) if bool(self.c.restrict) else None
    metrics, details = {}, {}
    for s in self.splits:
      f = feats[f'pug_{s}']
      x = features.variants(f)[variant]
      pred = linear.predict(head['w'][None], head['b'][None], x, class_subset=subset)[0]
      truth = np.asarray(self.names[s])[f['meta_label']]
      hits = np.asarray([self.inverse.get(int(p)) for p in pred], object) == truth
      metrics[f'pug_{s}_top1'] = float(hits.mean())
      details[s] = {'num_images': len(pred), 'restricted_to': len(subset) if subset else 1000}
    return metrics, details


class ThreeDCC:
  """ImageNet-3DCC corruptions × severities (module docstring); `config.imagenet_3dcc`."""

  columns = (('3dcc_top1', 'ImageNet-3DCC top-1 (mean)', True, 'percent'),)

  def __init__(self, c):
    self.c = c
    self.corruptions = [str(x) for x in c.corruptions]
    self.severities = [int(x) for x in c.severities]
    unknown = sorted(set(self.corruptions) - set(CORRUPTIONS_3DCC))
    if unknown:
      raise ValueError(
        f'imagenet_3dcc.corruptions: unknown {unknown}; choose from {CORRUPTIONS_3DCC}.'
      )
    self.levels = [(k, s) for k in self.corruptions for s in self.severities]

  def sets(self, data_dir: str, img_size: int) -> dict:
    splits = [f'{k}_{s}' for k, s in self.levels]
    b = datasets.find(data_dir, self.c.dataset, splits, how_to='imagenet_3dcc')
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    out, self.to_imagenet = {}, {}
    for split in splits:
      ts = datasets.TfdsImages(
        f'{self.c.dataset}_{split}', b, split, img_size, int(self.c.max_per_split),
        preprocess=str(self.c.preprocess),
      )  # fmt: skip
      names = ts.label_names()
      _check_names(
        self.c.dataset, names, index, 'ImageNet WordNet ids (n01440764, ...)',
        'import each <corruption>/<severity> folder, whose sub-folders are the wnids.',
      )  # fmt: skip
      self.to_imagenet[split] = np.asarray([index[n] for n in names])
      out[f'3dcc_{split}'] = ts
    return out

  def score(self, head: dict, variant: str, feats) -> tuple[dict, dict]:
    per_level = {}
    for k, s in self.levels:
      f = feats[f'3dcc_{k}_{s}']
      y = self.to_imagenet[f'{k}_{s}'][f['meta_label']]
      per_level[f'{k}_{s}'] = linear.score(head, features.variants(f)[variant], y)
    per_corruption = {
      k: float(np.mean([per_level[f'{k}_{s}'] for s in self.severities])) for k in self.corruptions
    }
    metrics = {f'3dcc_{k}_top1': v for k, v in per_corruption.items()}
    metrics['3dcc_top1'] = float(np.mean(list(per_corruption.values())))
    return metrics, {'per_level': per_level, 'severities': self.severities}


def readers(config) -> list:
  """The enabled readers: PUG when `pug_imagenet.splits`, 3DCC when `imagenet_3dcc.corruptions`."""
  out = []
  if config.pug_imagenet.splits:
    out.append(Pug(config.pug_imagenet))
  if config.imagenet_3dcc.corruptions:
    out.append(ThreeDCC(config.imagenet_3dcc))
  return out
