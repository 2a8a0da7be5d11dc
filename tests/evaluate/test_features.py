"""Feature extraction (`triplane3d.evaluate.features.Extractor`): backbones of one architecture
share one jitted function (traced and compiled once), each with its own weights."""

import jax
import jax.numpy as jnp
import numpy as np

from triplane3d.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from triplane3d.evaluate import backbones, features


class _Images:
  """Five random 28 px images (an `ImageSet`)."""

  name, identity = 'random', {'seed': 0}

  def __init__(self):
    self._u8 = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)

  def __len__(self):
    return len(self._u8)

  def meta(self):
    return {}

  def images(self, start, stop):
    return self._u8[start:stop]


def _extractor(seed, dtype='float32'):
  def load():
    b = backbones.Backbone('r', 'random:vit_tiny14', 'random', {}, variant='vit_tiny14')
    return backbones.create_model('vit_tiny14', dtype), b.load(seed=seed)[1]

  return features.Extractor(load, batch_size=4)


def test_backbones_of_one_architecture_share_the_compiled_function_not_the_weights():
  images = _Images()
  a, b, half = _extractor(0), _extractor(1), _extractor(0, 'bfloat16')
  fa, fb = a(images, False, 'a'), b(images, False, 'b')
  assert a._fn(False) is b._fn(False)  # One trace and compile for both.
  assert half._fn(False) is not a._fn(False) and a._fn(True) is not a._fn(False)
  assert not np.allclose(fa['cls'], fb['cls'])  # Each with its own weights.
  for ext, got in ((a, fa), (b, fb)):  # Equal to the model applied directly, image by image.
    x = (jnp.asarray(images.images(0, 5), jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    last = ext._model.apply(
      {'params': ext._params}, x, n=4, norm=True, return_class_token=True,
      method='get_intermediate_layers',
    )  # fmt: skip
    want = np.stack([np.asarray(c) for _, c in last], axis=1)
    assert got['cls'].shape == (5, 4, want.shape[-1])
    np.testing.assert_allclose(got['cls'], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got['patch_mean'], np.asarray(last[-1][0]).mean(1), atol=1e-5)
  assert jax.tree.leaves(a._params)[0] is not jax.tree.leaves(b._params)[0]
