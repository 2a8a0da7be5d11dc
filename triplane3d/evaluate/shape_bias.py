"""Cue-conflict shape bias (Geirhos et al. 2019), as the model-vs-human toolbox computes it.

A cue-conflict image has the shape of one of 16 categories and the texture of another; its file
name says which, `<shape><k>-<texture><m>.png` (e.g. `cat3-clock1.png`: a cat shaped, clock
textured image). A model's decision on an image is one of the 16 categories:

  probs_n1000  softmax over the 1000 ImageNet classes            (N, 1000)
  probs_n16    imagenet_to_16(probs): each category's MEAN over   (N, 16)
               its ImageNet indices (model-vs-human's default aggregation, not the sum)
  decision     argmax over the 16, a category name or an index into CATEGORIES

shape bias = shape hits / (shape hits + texture hits), counted over images whose shape and
texture categories differ; the rest of the decisions (neither cue) count for nothing.

The category → ImageNet index table is model-vs-human's; it lives in
data/model_vs_human_16_classes.json beside this file (provenance and licence in
third_party/model_vs_human/).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Sequence
from importlib import resources

import numpy as np

CATEGORIES = (
  'airplane', 'bear', 'bicycle', 'bird', 'boat', 'bottle', 'car', 'cat',
  'chair', 'clock', 'dog', 'elephant', 'keyboard', 'knife', 'oven', 'truck',
)  # fmt: skip

_TABLE_FILE = 'model_vs_human_16_classes.json'

# `<shape><k>-<texture><m>[.ext]` at the end of the file name. The shape must not follow a letter,
# so a prefix such as `im_` or `0001_` is skipped but `bobcat3-clock1` does not parse as `cat`.
_CATS = '|'.join(CATEGORIES)
_NAME_RE = re.compile(rf'(?<![a-z])({_CATS})(\d+)-({_CATS})(\d+)(?:\.[a-z0-9]+)?$', re.IGNORECASE)


@functools.cache
def imagenet_indices() -> dict[str, tuple[int, ...]]:
  """Each category's ImageNet-1k class indices, in CATEGORIES order."""
  text = resources.files('triplane3d.evaluate').joinpath('data', _TABLE_FILE).read_text()
  table = json.loads(text)['categories']
  if tuple(table) != CATEGORIES:
    raise ValueError(
      f'{_TABLE_FILE} lists categories {tuple(table)}, expected {CATEGORIES}: restore the file '
      'from third_party/model_vs_human/README.md (its source and commit).'
    )
  return {c: tuple(table[c]) for c in CATEGORIES}


def imagenet_to_16(probs_n1000) -> np.ndarray:
  """(N, 1000) ImageNet probabilities → (N, 16): the mean over each category's class indices.

  The mean, not the sum: categories with many ImageNet classes (dog has 109) would otherwise win
  by count. Pass probabilities (a softmax), as model-vs-human does, not logits.
  """
  probs = np.asarray(probs_n1000, np.float64)
  if probs.ndim != 2 or probs.shape[1] != 1000:
    raise ValueError(
      f'imagenet_to_16 takes (N, 1000) ImageNet probabilities, got shape {probs.shape}: '
      'apply the 1000-class head (and a softmax) first.'
    )
  if probs.min() < 0 or probs.max() > 1 + 1e-6:
    raise ValueError(
      f'imagenet_to_16 takes probabilities, got values in [{probs.min():.3g}, {probs.max():.3g}]: '
      'these look like logits; apply a softmax over the 1000 classes first.'
    )
  return np.stack([probs[:, list(ix)].mean(axis=1) for ix in imagenet_indices().values()], axis=1)


def parse_name(file_name: str) -> tuple[str, str]:
  """'results/0001_cat3-clock1.png' → ('cat', 'clock'): (shape, texture) of a cue-conflict image."""
  base = os.path.basename(str(file_name).replace('\\', '/'))
  m = _NAME_RE.search(base)
  if m is None:
    raise ValueError(
      f'cannot read shape and texture from {file_name!r}: cue-conflict file names end in '
      f'<shape><k>-<texture><m>.<ext> with both categories among {CATEGORIES} (e.g. '
      "'airplane1-bicycle2.png'); pass the stimuli's original file names."
    )
  return m.group(1).lower(), m.group(3).lower()


def _as_names(decisions) -> list[str]:
  names = []
  for d in decisions:
    if isinstance(d, (int, np.integer)):
      if not 0 <= d < len(CATEGORIES):
        raise ValueError(f'decision index {d} is outside 0..15: index into CATEGORIES.')
      names.append(CATEGORIES[int(d)])
    elif str(d) in CATEGORIES:
      names.append(str(d))
    else:
      raise ValueError(
        f'decision {d!r} is not one of the 16 categories {CATEGORIES}: map the 1000-class '
        'probabilities with imagenet_to_16 and take the argmax.'
      )
  return names


def _ratio(shape_hits: int, texture_hits: int) -> float:
  total = shape_hits + texture_hits
  return shape_hits / total if total else math.nan


def shape_bias(image_names: Sequence[str], decisions) -> dict:
  """Shape bias of decisions (category names or indices into CATEGORIES) on cue-conflict images.

  Returns 'shape_bias' (NaN when no decision hits either cue), 'shape_hits', 'texture_hits',
  'num_images' (images with a cue conflict, the ones counted), 'num_excluded' (shape == texture),
  and 'per_category': {category: shape bias over the images whose SHAPE is that category, NaN
  when none of them hits either cue}. Grouping by shape category follows model-vs-human's
  matrix plot (the paper's per-category figure), which groups rows by the `category` column,
  the image's shape category.
  """
  names = list(image_names)
  decided = _as_names(decisions)
  if len(names) != len(decided):
    raise ValueError(
      f'{len(names)} image names but {len(decided)} decisions: pass one decision per image, '
      'in the same order.'
    )
  hits = {c: [0, 0] for c in CATEGORIES}  # Category → [shape hits, texture hits].
  used = excluded = 0
  for name, decision in zip(names, decided):
    shape, texture = parse_name(name)
    if shape == texture:  # No conflict: a hit would count for both cues.
      excluded += 1
      continue
    used += 1
    hits[shape][0] += decision == shape
    hits[shape][1] += decision == texture
  shape_hits = sum(h[0] for h in hits.values())
  texture_hits = sum(h[1] for h in hits.values())
  return {
    'shape_bias': _ratio(shape_hits, texture_hits),
    'shape_hits': shape_hits,
    'texture_hits': texture_hits,
    'num_images': used,
    'num_excluded': excluded,
    'per_category': {c: _ratio(*h) for c, h in hits.items()},
  }
