"""triplane3d.pretrain: the synthetic stand-in for DINOv2 weights, and the copy the demo ships."""

import json
import os

import jax
import numpy as np

from triplane3d import convert, pretrain
from triplane3d.configs import demo
from triplane3d.data import synthetic
from triplane3d.models import vit


def _shapes(tree):
  return jax.tree_util.tree_map(np.shape, tree)


def test_scenes_carry_their_generators_labels():
  images, labels = pretrain.scenes(7, 6, 28, 'class')
  assert images.shape == (6, 28, 28, 3) and images.dtype == np.uint8
  for i in range(6):
    assert labels[i] == synthetic.sample_scene(i, 7, texture_mode='class')['labels']['label']
  assert len({im.tobytes() for im in images}) == 6


def test_write_gives_weights_that_load_as_dinov2(tmp_path):
  o = pretrain.Options(
    img_size=28, num_scenes=32, num_val=16, steps=3, batch_size=4, warmup_steps=1, log_every=1
  )
  out = str(tmp_path / 'teacher.safetensors')
  record = pretrain.write(o, out)
  with open(out + '.json') as f:
    assert json.load(f) == json.loads(json.dumps(record))
  assert [h['step'] for h in record['history']] == [1, 2, 3]
  assert 0.0 <= record['val_accuracy'] <= 1.0
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
  # Never the demo's own scenes (generator seed config.seed, training and held-out indices).
  assert c.seed not in (made['scene_seed'], made['val_seed'])
  # It learned the task it stands in for: well above chance (0.2) on validation scenes.
  assert record['val_accuracy'] >= 0.5
  loaded = convert.load_dinov2(path, c.model.variant)
  fresh = vit.init_params(vit.create(c.model.variant), jax.random.key(0), c.model.img_size)
  assert _shapes(loaded) == _shapes(fresh)
