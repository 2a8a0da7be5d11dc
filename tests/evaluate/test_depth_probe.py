"""The ridge depth probe against an explicit numpy solution, a planted linear depth recovered,
and the metrics' handling of missing depth."""

import numpy as np
import pytest

from triplane3d.evaluate import depth_probe

G, S, F = 2, 2, 3  # 2×2 patches, 2×2 depth values per patch, 3 channels per token.


def _set(rng, n, w_true=None, bias=None):
  patches = rng.normal(size=(n, G * G, F)).astype(np.float32)
  cls = rng.normal(size=(n, F)).astype(np.float32)
  if w_true is None:
    depth = rng.uniform(1.5, 2.5, size=(n, G * S, G * S))
  else:
    x = np.concatenate([patches, np.broadcast_to(cls[:, None], patches.shape)], -1)
    rows = x @ w_true + bias  # (n, P, S²): planted per-position bias + linear map.
    depth = rows.reshape(n, G, G, S, S).transpose(0, 1, 3, 2, 4).reshape(n, G * S, G * S)
  return {'patches': patches, 'patch_cls': cls, 'meta_depth': depth.astype(np.float32)}


def test_matches_explicit_ridge_solution():
  rng = np.random.default_rng(0)
  train, val = _set(rng, 12), _set(rng, 5)
  alpha = 0.3
  probe = depth_probe.fit(train, val, alphas=(alpha,))
  # Reference: one row per patch, centred per patch position, scaled by the global std.
  x = np.concatenate(
    [train['patches'], np.broadcast_to(train['patch_cls'][:, None], train['patches'].shape)], -1
  ).astype(np.float64)  # (n, P, 2F)
  d = train['meta_depth'].astype(np.float64).reshape(12, G, S, G, S)
  y = d.transpose(0, 1, 3, 2, 4).reshape(12, G * G, S * S)
  xc, yc = x - x.mean(0), y - y.mean(0)
  xs = (xc / (xc.reshape(-1, 2 * F).std(0) + 1e-6)).reshape(-1, 2 * F)
  m = len(xs)
  w = np.linalg.solve(xs.T @ xs / m + alpha * np.eye(2 * F), xs.T @ yc.reshape(m, -1) / m)
  np.testing.assert_allclose(probe['w'], w, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(probe['y_mean'], y.mean(0), rtol=1e-12)


def test_planted_linear_depth_is_recovered():
  rng = np.random.default_rng(1)
  w_true = rng.normal(size=(2 * F, S * S)) * 0.05
  bias = rng.uniform(1.9, 2.1, size=(G * G, S * S))
  train, val, test = (_set(rng, n, w_true, bias) for n in (200, 50, 50))
  r = depth_probe.evaluate(train, val, test)
  assert r['rmse'] < 1e-3
  assert r['alpha'] == min(depth_probe.ALPHAS)  # Noise-free: the least shrinkage wins.
  assert r['baselines']['mean_map']['rmse'] > 0.05 > r['rmse']
  assert r['protocol']['outputs_per_patch'] == S * S and r['protocol']['target_side'] == G * S


def test_metrics_skip_missing_depth_and_baselines():
  gt = np.asarray([[[2.0, 0.0], [4.0, 2.0]]])  # One image; the 0 is missing depth.
  pred = np.asarray([[[3.0, 9.0], [4.0, 1.0]]])
  m = depth_probe.metrics(pred, gt)
  assert m['rmse'] == pytest.approx(np.sqrt((1 + 0 + 1) / 3))
  assert m['abs_rel'] == pytest.approx((0.5 + 0 + 0.5) / 3)
  train = np.asarray([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
  test = np.asarray([[[2.0, 2.0], [2.0, 2.0]]])
  b = depth_probe.baselines(train, test)
  assert b['mean_depth']['rmse'] == pytest.approx(0.5)  # The train mean, 2.5, everywhere.
  assert b['mean_map']['rmse'] == pytest.approx(np.sqrt((1 + 0 + 1 + 4) / 4))
