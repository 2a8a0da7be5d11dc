"""triplane3d.pretrain: the synthetic stand-in for DINOv2 weights, and the copy the demo ships."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from triplane3d import convert, pretrain
from triplane3d.configs import demo
from triplane3d.configs.eval import synthetic as eval_synthetic
from triplane3d.data import synthetic
from triplane3d.models import vit


def _shapes(tree):
  return jax.tree_util.tree_map(np.shape, tree)


def test_scenes_carry_their_generators_labels():
  images, labels, fractions, textures = pretrain.scenes(7, 6, 28, 'class', cells=4)
  assert images.shape == (6, 28, 28, 3) and images.dtype == np.uint8
  assert fractions.shape == (6, 4, 4, 1 + len(synthetic.SHAPES))
  camera = pretrain.Camera.from_config(pretrain.common.get_base_config().camera)
  for i in range(6):
    scene = synthetic.sample_scene(i, 7, texture_mode='class')
    assert labels[i] == scene['labels']['label']
    assert textures[i] == scene['labels']['texture_label']
    rgb, depth = synthetic.render(scene, camera, 28)
    np.testing.assert_array_equal(images[i], rgb)
    # The background share of each 7×7 cell, counted from the depth map instead of the ids.
    bg = (depth == camera.far).reshape(4, 7, 4, 7).mean((1, 3))
    np.testing.assert_allclose(fractions[i, ..., 0], bg, atol=1e-3)
    np.testing.assert_allclose(fractions[i].sum(-1), 1.0, atol=2e-3)
    # Pixels with the labelled object's shape exist wherever it is visible (it always is here).
    assert fractions[i, ..., 1 + labels[i]].sum() > 0
  assert len({im.tobytes() for im in images}) == 6
  with pytest.raises(ValueError, match='must divide'):
    pretrain.scenes(7, 1, 28, 'class', cells=5)


# Options small enough for a test: a few steps on a few 28-px scenes.
TINY = dict(img_size=28, num_scenes=32, num_val=16, steps=3, batch_size=4, warmup_steps=1)


def test_write_gives_weights_that_load_as_dinov2(tmp_path):
  o = pretrain.Options(**TINY, log_every=1)
  out = str(tmp_path / 'teacher.safetensors')
  record = pretrain.write(o, out)
  with open(out + '.json') as f:
    assert json.load(f) == json.loads(json.dumps(record))
  assert [h['step'] for h in record['history']] == [1, 2, 3]
  assert 0.0 <= record['val_accuracy'] <= 1.0 and 0.0 <= record['val_object_iou'] <= 1.0
  loaded = convert.load_dinov2(out, 'vit_tiny14')
  fresh = vit.init_params(vit.create('vit_tiny14'), jax.random.key(0), 28)
  assert _shapes(loaded) == _shapes(fresh)
  # Trained, not the initialisation written back.
  assert not np.allclose(loaded['patch_embed']['kernel'], fresh['patch_embed']['kernel'])


def test_the_demo_starts_from_the_shipped_weights():
  c = demo.get_config()
  path = c.model.init_from
  assert os.path.isfile(path), path
  with open(path + '.json') as f:
    record = json.load(f)
  made = record['options']
  assert made['variant'] == c.model.variant and made['img_size'] == c.model.img_size
  assert made['texture_mode'] == 'class'  # The demo's scenes tie texture to shape too.
  # Never the demo's own scenes (generator seed config.seed, training and held-out indices),
  # nor the synthetic evaluation suite's sets (seeds synthetic.seed + 0..8, one per set).
  used = {made['scene_seed'], made['val_seed']}
  assert c.seed not in used
  first = eval_synthetic.get_config().synthetic.seed
  assert not used & set(range(first, first + 9)), (used, first)
  # It learned the task it stands in for: well above chance (0.2) on validation scenes.
  assert record['val_accuracy'] >= 0.5
  # And its patch tokens say where the objects are (segmentation objective, on by default).
  assert made['segment_weight'] > 0 and record['val_object_iou'] >= 0.4
  loaded = convert.load_dinov2(path, c.model.variant)
  fresh = vit.init_params(vit.create(c.model.variant), jax.random.key(0), c.model.img_size)
  assert _shapes(loaded) == _shapes(fresh)


@pytest.mark.parametrize(
  'bad, message',
  [
    ({'warmup_steps': 10, 'steps': 10}, 'warmup_steps=10 must be in'),
    ({'img_size': 30}, 'multiple of the patch size 14'),
    ({'segment_sub': 3}, 'segment_sub=3 must divide'),
    ({'val_seed': 3001}, 'must differ'),
    ({'batch_size': 0}, 'must be ≥ 1'),
    ({'shuffle_prob': 1.5}, 'shuffle_prob=1.5 must be in'),
    ({'segment_labels': 'parts'}, "segment_labels='parts'"),
    ({'texture_class_prob': -0.1}, 'texture_class_prob=-0.1'),
    ({'shape_weight': -1.0}, 'shape_weight must be ≥ 0'),
    ({'shape_weight': 0.0, 'segment_weight': 0.0}, 'nothing to learn'),
  ],
)
def test_options_that_cannot_work_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    pretrain.train(pretrain.Options(**bad))


def test_shape_weight_zero_trains_no_shape_head_but_the_texture_head():
  o = pretrain.Options(
    **TINY,
    log_every=3,
    texture_mode='mixed',
    texture_class_prob=0.9,
    texture_weight=1.0,
    shape_weight=0.0,
    weight_decay=0.0,  # Decay alone would move a head that gets no gradient.
  )
  init, _ = pretrain.train(dataclasses.replace(o, steps=2, warmup_steps=1))  # Any start point.
  params, history = pretrain.train(o, init=init)
  np.testing.assert_array_equal(params['head']['kernel'], init['head']['kernel'])
  assert not np.allclose(params['texture_head']['kernel'], init['texture_head']['kernel'])
  assert not np.allclose(
    params['backbone']['patch_embed']['kernel'], init['backbone']['patch_embed']['kernel']
  )
  assert 0.0 <= history[-1]['val_texture_accuracy'] <= 1.0


def test_shuffled_patches_keep_every_patch_and_carry_their_cell_labels():
  g, patch, k, b = 4, 14, 2, 3
  ids = np.arange(b * g * g).reshape(b, g, g)  # A distinct value per patch.
  x = np.repeat(np.repeat(ids, patch, 1), patch, 2)[..., None].repeat(3, -1).astype(np.int32)
  seg = np.repeat(np.repeat(ids, k, 1), k, 2)[..., None].astype(np.float32)
  which = np.asarray([True, False, True])
  x2, seg2 = pretrain.shuffle_patches(x, seg, patch, which, np.random.default_rng(0))
  np.testing.assert_array_equal(x2[1], x[1])  # Not chosen: unchanged.
  for i in (0, 2):
    got = x2[i, ::patch, ::patch, 0]
    assert sorted(got.ravel()) == sorted(ids[i].ravel()) and not np.array_equal(got, ids[i])
    assert np.all(x2[i] == np.repeat(np.repeat(got, patch, 0), patch, 1)[..., None])  # Whole.
    np.testing.assert_array_equal(seg2[i, ::k, ::k, 0], got)  # Labels moved with the pixels.
  assert np.array_equal(x[0, ::patch, ::patch, 0], ids[0])  # The input is not modified.
