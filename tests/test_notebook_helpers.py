"""triplane3d.notebook: the PCA picture against features with known principal components,
config loading, and the panel layout."""

import numpy as np
import pytest

from triplane3d import notebook
from triplane3d.configs import demo


def _minmax(x):
  return (x - x.min()) / (x.max() - x.min())


def _known_features(h=6, w=5, d=16, seed=0):
  """Features whose principal components are known: three orthogonal, centred patch patterns
  with variances 100 : 9 : 1, rotated into D dimensions and offset by a constant."""
  rng = np.random.default_rng(seed)
  n = h * w
  patterns = np.linalg.qr(rng.normal(size=(n, 3)))[0]
  patterns -= patterns.mean(axis=0)
  patterns = np.linalg.qr(patterns)[0]  # Centred and orthonormal.
  rotation = np.linalg.qr(rng.normal(size=(d, d)))[0][:3]
  feats = (patterns * [10.0, 3.0, 1.0]) @ rotation + rng.normal(size=d)
  return feats, patterns


def test_pca_rgb_recovers_the_components_in_order_with_a_fixed_sign():
  feats, patterns = _known_features()
  out = notebook.pca_rgb(feats, (6, 5))
  assert out.shape == (6, 5, 3) and out.dtype == np.float32
  for c in range(3):
    p = patterns[:, c] * np.sign(patterns[np.argmax(np.abs(patterns[:, c])), c])
    np.testing.assert_allclose(out[..., c].ravel(), _minmax(p), atol=1e-5)
    assert out[..., c].min() == 0.0 and out[..., c].max() == pytest.approx(1.0)
  # The picture does not depend on the features' sign, offset or scale.
  np.testing.assert_allclose(notebook.pca_rgb(-3.0 * feats + 7.0, (6, 5)), out, atol=1e-5)


def test_pca_rgb_rank_deficient_and_bad_shapes():
  feats, patterns = _known_features()
  rank1 = np.outer(patterns[:, 0], np.arange(1.0, 17.0))
  out = notebook.pca_rgb(rank1, (6, 5))
  assert np.all(out[..., 1:] == 0.5)  # No variance left: mid-grey, not amplified noise.
  assert out[..., 0].min() == 0.0 and out[..., 0].max() == pytest.approx(1.0)
  assert np.all(notebook.pca_rgb(np.ones((30, 4)), (6, 5)) == 0.5)
  assert notebook.load_config('eval.synthetic:tiny').img_size == 28
  with pytest.raises(ValueError, match=r'features must be \(h·w=30, D\)'):
    notebook.pca_rgb(feats[:-1], (6, 5))


def test_feature_change_is_the_cosine_distance_per_patch():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(6, 8))
  b = a * rng.uniform(0.5, 3.0, size=(6, 1))  # Rescaled: no change of direction.
  b[1] = -a[1]  # Opposite.
  b[2] = a[3] - a[3] @ a[2] / (a[2] @ a[2]) * a[2]  # Orthogonal.
  b[4] = np.roll(a[4], 1)
  out = notebook.feature_change(a, b, (2, 3))
  assert out.shape == (2, 3) and out.dtype == np.float32
  ref = 1 - np.sum(a * b, 1) / np.maximum(
    np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30
  )
  np.testing.assert_allclose(out.ravel(), ref, atol=1e-6)
  np.testing.assert_allclose(out.ravel()[[0, 1, 2, 3, 5]], [0, 2, 1, 0, 0], atol=1e-6)
  with pytest.raises(ValueError, match='differ in shape'):
    notebook.feature_change(a, b[:, :4], (2, 3))


def test_panel_places_each_tile_under_its_caption():
  red = np.zeros((4, 4, 3), np.float32)
  red[..., 0] = 1.0
  blue = np.zeros((2, 2, 3), np.uint8)
  blue[..., 2] = 255
  out = notebook.panel([('red', red), ('blue', blue), ('grey', np.full((3, 3), 0.5))], side=40)
  assert out.shape == (18 + 40, 3 * 40 + 2 * 6, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[18:, :40], np.broadcast_to([255, 0, 0], (40, 40, 3)))
  np.testing.assert_array_equal(out[18:, 46:86], np.broadcast_to([0, 0, 255], (40, 40, 3)))
  np.testing.assert_array_equal(out[18:, 92:], np.full((40, 40, 3), 128))
  assert (out[:18].max(axis=-1) < 100).any()  # Caption text.


def test_load_config_by_name_and_by_file():
  config = notebook.load_config('demo', {'train.num_steps': 7})
  assert config.train.num_steps == 7 and config.model.init_from == demo.PRETRAINED
  from_file = notebook.load_config(demo.__file__)
  assert from_file.to_dict() == demo.get_config().to_dict()
  assert notebook.load_config('eval.synthetic:tiny').img_size == 28
  with pytest.raises(ValueError, match=r"'train.num_stepz'.*Did you mean train.num_steps"):
    notebook.load_config('demo', {'train.num_stepz': 7})
