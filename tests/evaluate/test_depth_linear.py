"""DINOv2's linear depth probe: SigLoss and the gradient loss against numpy float64 loops, the
bins → depth head on a hand case and against an upsample-then-convolve reference, the
schedules, and the trained probe beating the mean depth on synthetic scenes (exact depth)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from triplane3d.evaluate import backbones, depth_linear, depth_losses, features
from triplane3d.evaluate.synthetic_suite import SceneSet


def _depths(rng, shape, holes=0.2):
  gt = rng.uniform(0.5, 9.0, shape)
  gt[rng.random(shape) < holes] = 0.0  # NYU's missing measurements.
  return rng.uniform(0.5, 9.0, shape), gt


def test_sigloss_matches_numpy():
  pred, gt = _depths(np.random.default_rng(0), (3, 7, 9))
  g = np.log(pred[gt > 0] + 1e-3) - np.log(gt[gt > 0] + 1e-3)  # Valid pixels of the batch.
  want = np.sqrt(np.var(g, ddof=1) + 0.15 * np.mean(g) ** 2)
  got = depth_losses.sigloss(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  warm = depth_losses.sigloss(jnp.asarray(pred), jnp.asarray(gt), warm_up=True)
  np.testing.assert_allclose(warm, np.sqrt(0.15 * np.mean(g) ** 2), rtol=1e-5)


def _gradient_loss_loops(pred, gt):
  """Per image: every pixel pair 2 apart, at strides 1, 2, 4, 6, over the valid count."""
  total = 0.0
  for p_full, t_full in zip(pred, gt):
    for stride in (1, 2, 4, 6):
      p, t = p_full[::stride, ::stride], t_full[::stride, ::stride]
      h, w = t.shape
      d = {
        (y, x): math.log(p[y, x] + 1e-3) - math.log(t[y, x] + 1e-3)
        for y in range(h)
        for x in range(w)
        if t[y, x] > 0
      }
      s = 0.0
      for (y, x), v in d.items():
        for other in ((y + 2, x), (y, x + 2)):
          if other in d:
            s += abs(v - d[other])
      total += s / len(d)
  return total / len(pred)


def test_gradient_loss_matches_numpy_loops():
  pred, gt = _depths(np.random.default_rng(1), (2, 13, 15))
  got = depth_losses.gradient_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(gt, jnp.float32))
  np.testing.assert_allclose(got, _gradient_loss_loops(pred, gt), rtol=1e-5)


def test_bins_to_depth_hand_case():
  """3 bins [1, 2, 3], logits (-1, 0.9, 1.9): ReLU + 0.1 = (0.1, 1, 2), depth 8.1 / 3.1."""
  s = depth_linear.Settings(n_bins=3, min_depth=1.0, max_depth=3.0, upsample=1)
  head = {'w': jnp.zeros((8, 3)), 'b': jnp.asarray([-1.0, 0.9, 1.9])}  # K=4 blocks of D=1.
  d = depth_linear.depth_map(head, jnp.zeros((1, 1, 4)), jnp.zeros((1, 4)), s)
  np.testing.assert_allclose(d, [[[8.1 / 3.1]]], rtol=1e-6)


def _torch_bilinear(x_hwc, out_h, out_w):
  """F.interpolate(mode='bilinear', align_corners=False) written out: src = (dst + 0.5)·in/out
  − 0.5, clamped at 0, right neighbour clamped to the last pixel."""
  h, w = x_hwc.shape[:2]

  def taps(n_out, n_in):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  y0, y1, fy = taps(out_h, h)
  x0, x1, fx = taps(out_w, w)
  top = x_hwc[y0][:, x0] * (1 - fx)[None, :, None] + x_hwc[y0][:, x1] * fx[None, :, None]
  bot = x_hwc[y1][:, x0] * (1 - fx)[None, :, None] + x_hwc[y1][:, x1] * fx[None, :, None]
  return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def test_head_equals_dinov2_order_upsample_then_conv():
  """The reference builds DINOv2's input ([x_k, cls_k] per block), upsamples it ×4, then applies
  the 1×1 conv; depth_map convolves first. Both are then compared at a 10×10 target."""
  rng = np.random.default_rng(2)
  k, d, g, bins = 4, 3, 3, 16
  s = depth_linear.Settings(n_bins=bins, upsample=4)
  patches, cls = rng.normal(size=(g * g, k * d)), rng.normal(size=(k * d,))
  head = {'w': rng.normal(size=(2 * k * d, bins)), 'b': rng.normal(size=(bins,))}
  x = np.concatenate(
    [np.concatenate([patches[:, i * d : (i + 1) * d], np.tile(cls[i * d : (i + 1) * d], (g * g, 1))], 1) for i in range(k)], 1
  ).reshape(g, g, 2 * k * d)  # fmt: skip
  z = _torch_bilinear(x, 4 * g, 4 * g) @ head['w'] + head['b']
  wts = np.maximum(z, 0) + 0.1
  ref = (wts / wts.sum(-1, keepdims=True)) @ np.linspace(1e-3, 10.0, bins)
  ref = _torch_bilinear(ref[..., None], 10, 10)[..., 0]
  jhead = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), head)
  got = depth_linear.depth_map(jhead, jnp.asarray(patches[None]), jnp.asarray(cls[None]), s)
  got = depth_linear._to_target(got, (10, 10))[0]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_schedules_follow_mmcv():
  s = depth_linear.Settings(steps=1000, warmup_steps=300)
  lr, b1 = depth_linear.lr_schedule(s), depth_linear.beta1_schedule(s)

  def cosine(t):
    return 1e-12 + (1e-4 - 1e-12) / 2 * (1 + math.cos(math.pi * t / 1000))

  # float32: 1 - (1 - 0.001) keeps 4 digits.
  assert float(lr(0)) == pytest.approx(1e-4 * 1e-3, rel=1e-4)  # Warm-up starts at 0.001.
  assert float(lr(150)) == pytest.approx(cosine(150) * (1 - 0.5 * 0.999), rel=1e-5)
  assert float(lr(600)) == pytest.approx(cosine(600), rel=1e-5)
  assert [round(float(b1(t)), 6) for t in (0, 299, 999)] == [0.95, 0.85, 0.95]


@pytest.fixture(scope='module')
def scene_features(tmp_path_factory):
  """Random-ViT depth-probe features of synthetic scenes at 56 px (4×4 patches), full depth."""
  cache = str(tmp_path_factory.mktemp('scenes'))
  sets = {
    name: SceneSet(name, seed, n, 56, cache, texture='random', depth_sub=14)
    for name, seed, n in (('train', 11, 200), ('test', 12, 40))
  }
  extractor = features.Extractor(
    lambda: (backbones.create_model('vit_tiny14'), backbones.Backbone(
      'r', 'random:vit_tiny14', 'random', {}, variant='vit_tiny14').load()[1]),
    batch_size=40,
  )  # fmt: skip
  out = {}
  for name, image_set in sets.items():
    meta = {f'meta_{k}': v for k, v in image_set.meta().items()}
    out[name] = {**extractor(image_set, True, desc=name), **meta}
  return out


def test_probe_beats_mean_depth_on_synthetic_scenes(scene_features):
  """A random ViT's features at a 4×4 patch grid carry little depth: the probe's margin over the
  training mean depth is ~5 % (0.168 vs 0.177 m-equivalents). The protocol's lr 1e-4 needs
  thousands of steps (38,400 in DINOv2); 400 steps at 3e-3 reach the same plateau here."""
  train, test = scene_features['train'], scene_features['test']
  assert train['meta_depth'].shape == (200, 56, 56)
  s = depth_linear.Settings(steps=400, warmup_steps=40, batch_size=8, lr=3e-3, max_depth=4.0)
  r = depth_linear.evaluate(train, test, s)
  base = r['baselines']['mean_depth']
  assert r['rmse'] < 0.97 * base['rmse'], (r['rmse'], base)
  assert r['abs_rel'] < base['abs_rel'] and r['delta1'] > base['delta1']
  assert np.isfinite(r['loss_curve']['loss']).all() and np.isfinite(r['final_loss'])
  assert r['protocol']['target_hw'] == [56, 56]
