"""Shape bias: hand-counted decision tables, the mean aggregation against numpy, name parsing."""

import json
import math
from importlib import resources

import numpy as np
import pytest

from triplane3d.evaluate import shape_bias as sb


def test_categories_and_table():
  assert sb.CATEGORIES == tuple(sorted(sb.CATEGORIES))
  assert len(sb.CATEGORIES) == 16
  table = sb.imagenet_indices()
  all_ix = [i for ix in table.values() for i in ix]
  assert len(all_ix) == len(set(all_ix))  # No ImageNet class counts for two categories.
  assert all(0 <= i < 1000 for i in all_ix)
  # Spot checks against the upstream lists (third_party/model_vs_human/README.md).
  assert table['airplane'] == (404,)
  assert table['cat'] == (281, 282, 283, 284, 285, 286)
  assert table['truck'] == (555, 569, 656, 675, 717, 734, 864, 867)
  assert len(table['dog']) == 109


def test_imagenet_to_16_is_mean_over_indices():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 1000))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  # Independent reading of the table: straight from the JSON file, then a numpy loop.
  path = resources.files('triplane3d.evaluate') / 'data' / 'model_vs_human_16_classes.json'
  table = json.loads(path.read_text())['categories']
  want = np.zeros((5, 16))
  for n in range(5):
    for k, c in enumerate(sorted(table)):
      want[n, k] = sum(probs[n, i] for i in table[c]) / len(table[c])
  np.testing.assert_allclose(sb.imagenet_to_16(probs), want, rtol=1e-12)
  # The sum would differ wherever a category has more than one index.
  assert not np.allclose(
    sb.imagenet_to_16(probs)[:, sb.CATEGORIES.index('dog')], probs[:, table['dog']].sum(1)
  )


def test_imagenet_to_16_rejects_bad_input():
  with pytest.raises(ValueError, match=r'\(N, 1000\)'):
    sb.imagenet_to_16(np.zeros((2, 16)))
  with pytest.raises(ValueError, match='softmax'):
    sb.imagenet_to_16(np.full((2, 1000), -3.0))


@pytest.mark.parametrize(
  'name, want',
  [
    ('airplane1-bicycle2.png', ('airplane', 'bicycle')),
    ('results/0001_cat3-clock1.png', ('cat', 'clock')),
    ('im_dog7-elephant1.png', ('dog', 'elephant')),
    ('/data/cue-conflict/dog/dog10-bird2.png', ('dog', 'bird')),
    ('keyboard12-knife3.JPEG', ('keyboard', 'knife')),
    ('oven1-oven2.png', ('oven', 'oven')),
    ('truck4-car1', ('truck', 'car')),
  ],
)
def test_parse_name(name, want):
  assert sb.parse_name(name) == want


@pytest.mark.parametrize(
  'name',
  [
    'cat.png',
    'cat3-horse1.png',
    'bobcat3-clock1.png',
    'cat-clock1.png',
    'cat3_clock1.png',
  ],
)
def test_parse_name_error_says_the_pattern(name):
  with pytest.raises(ValueError, match=r'<shape><k>-<texture><m>'):
    sb.parse_name(name)


def test_known_shape_bias_by_hand():
  names = [
    'cat1-clock1.png',  # decision cat:   shape hit (cat)
    'cat2-dog1.png',  # decision cat:   shape hit (cat)
    'dog1-bird1.png',  # decision dog:   shape hit (dog)
    'dog2-cat1.png',  # decision cat:   texture hit (dog)
    'bird1-car1.png',  # decision knife: neither (bird)
    'x_car1-oven1.png',  # decision truck: neither (car)
    'clock1-clock2.png',  # conflict-free:  excluded though the decision is right
    'clock3-clock4.png',  # conflict-free:  excluded
  ]
  decisions = ['cat', 'cat', 'dog', 'cat', 'knife', 'truck', 'clock', 'clock']
  r = sb.shape_bias(names, decisions)
  assert r['shape_bias'] == 0.75
  assert (r['shape_hits'], r['texture_hits']) == (3, 1)
  assert (r['num_images'], r['num_excluded']) == (6, 2)
  pc = r['per_category']
  assert set(pc) == set(sb.CATEGORIES)
  assert pc['cat'] == 1.0
  assert pc['dog'] == 0.5
  assert math.isnan(pc['bird']) and math.isnan(pc['car'])  # Only "neither" decisions.
  assert math.isnan(pc['clock'])  # Its images were all conflict-free.
  # Indices into CATEGORIES give the same answer as names.
  r_ix = sb.shape_bias(names, [sb.CATEGORIES.index(d) for d in decisions])
  assert {k: v for k, v in r_ix.items() if k != 'per_category'} == {
    k: v for k, v in r.items() if k != 'per_category'
  }


def test_texture_only_and_no_hits():
  r = sb.shape_bias(['bear1-boat1.png', 'boat2-bear3.png'], ['boat', 'bear'])
  assert r['shape_bias'] == 0.0 and r['texture_hits'] == 2
  r = sb.shape_bias(['bear1-boat1.png'], ['oven'])
  assert math.isnan(r['shape_bias'])


def test_bad_decisions_and_lengths():
  with pytest.raises(ValueError, match='not one of the 16'):
    sb.shape_bias(['cat1-dog1.png'], ['tabby'])
  with pytest.raises(ValueError, match=r'outside 0\.\.15'):
    sb.shape_bias(['cat1-dog1.png'], [16])
  with pytest.raises(ValueError, match='one decision per image'):
    sb.shape_bias(['cat1-dog1.png', 'cat2-dog1.png'], ['cat'])
