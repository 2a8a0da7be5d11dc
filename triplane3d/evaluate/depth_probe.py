"""A linear per-patch depth probe on frozen features: ridge regression, closed form.

Each patch's feature (its tokens from K blocks, `features.depth_blocks`, concatenated with the
class tokens of the same blocks: DINOv2's depth-probe input) predicts the s×s depth values
inside that patch — a 1×1 convolution to s² channels followed by a pixel shuffle, i.e. a linear
map per patch. Shapes: features patches (N, P, F), patch_cls (N, F); depth (N, G·s, G·s) with
G² = P; one row per patch, M = N·P rows of 2F inputs and s² outputs.

Each patch position also has its own bias, the training set's mean depth there (a 1×1
convolution with a per-position bias): the features then have to explain the depth beyond the
average scene, and a probe that learns nothing falls back to the per-pixel mean map, the
stronger of the two baselines below (synthetic objects sit near the image centre).

Fitting: inputs centred per position and scaled by their std over the training rows; ridge
regression W = (XᵀX/M + αI)⁻¹ XᵀY/M through one eigendecomposition of XᵀX/M, for every α of
`ALPHAS` (relative to the unit average eigenvalue of standardised inputs); α chosen by per-image
RMSE on the validation set; predictions clipped to the training depth range (as DINOv2 clips to
[min_depth, max_depth]). All sums in float64, in chunks of rows, so memory stays at a few
copies of one (2F, 2F) matrix whatever N.

This is not DINOv2's NYU protocol (256 depth bins, ×4 bilinear upsampling, SigLoss + gradient
loss, AdamW): it is the exact, hyperparameter-light version that runs at tiny size on a CPU.

Metrics: RMSE (per image, then averaged over images, as NYU evaluations do) and abs-rel
(mean |pred − gt| / gt), over pixels with depth > 0. Baselines on the same test images: the training set's mean depth
(one number) and its per-pixel mean depth map.
"""

from __future__ import annotations

import math

import numpy as np

VERSION = 2  # Part of every cached probe result's key: bump when the probe changes.
ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)
_CHUNK = 8192  # Rows per chunk of float64 work.


def _grid(feats: dict) -> tuple[int, int]:
  """(G, s): patches per side and depth values per patch side."""
  p = feats['patches'].shape[1]
  g = math.isqrt(p)
  side = feats['meta_depth'].shape[1]
  if g * g != p or side % g:
    raise ValueError(
      f'depth maps of side {side} do not tile a {g}×{g} patch grid ({p} patches): render the '
      'depth at a multiple of the patch grid.'
    )
  return g, side // g


def _rows(feats: dict, start: int, stop: int) -> np.ndarray:
  """Inputs of images [start, stop): (B·P, 2F) float64, patch tokens then class tokens."""
  patches = np.asarray(feats['patches'][start:stop], np.float64)
  cls = np.asarray(feats['patch_cls'][start:stop], np.float64)
  cls = np.broadcast_to(cls[:, None], patches.shape[:2] + cls.shape[1:])
  return np.concatenate([patches, cls], axis=-1).reshape(-1, 2 * patches.shape[-1])


def _targets(feats: dict, start: int, stop: int) -> np.ndarray:
  """Depth of images [start, stop) as (B·P, s²) rows, in the rows' patch order."""
  g, s = _grid(feats)
  d = np.asarray(feats['meta_depth'][start:stop], np.float64)
  return d.reshape(-1, g, s, g, s).transpose(0, 1, 3, 2, 4).reshape(-1, s * s)


def _untile(rows: np.ndarray, g: int, s: int) -> np.ndarray:
  """(B·P, s²) rows → depth maps (B, G·s, G·s)."""
  return rows.reshape(-1, g, g, s, s).transpose(0, 1, 3, 2, 4).reshape(-1, g * s, g * s)


def _chunks(n_images: int, patches: int):
  step = max(1, _CHUNK // patches)
  for i in range(0, n_images, step):
    yield i, min(n_images, i + step)


def metrics(pred_nhw: np.ndarray, gt_nhw: np.ndarray) -> dict[str, float]:
  """RMSE (per image, averaged over images) and abs-rel of depth maps (N, H, W), counting only
  pixels with a depth > 0 (datasets such as NYU mark missing depth with 0)."""
  pred = np.asarray(pred_nhw, np.float64).reshape(len(gt_nhw), -1)
  gt = np.asarray(gt_nhw, np.float64).reshape(len(gt_nhw), -1)
  valid = gt > 0
  count = valid.sum(axis=1)
  err = np.where(valid, pred - gt, 0.0)
  rmse = np.sqrt((err**2).sum(axis=1)[count > 0] / count[count > 0])
  return {
    'rmse': float(rmse.mean()),
    'abs_rel': float((np.abs(err) / np.where(valid, gt, 1.0)).sum() / valid.sum()),
  }


def baselines(train_depth: np.ndarray, test_depth: np.ndarray) -> dict[str, dict]:
  """The trivial predictors on the test maps: train mean depth, train per-pixel mean map."""
  train = np.asarray(train_depth, np.float64)
  mean_depth = np.full(test_depth.shape, train.mean())
  mean_map = np.broadcast_to(train.mean(axis=0), test_depth.shape)
  return {'mean_depth': metrics(mean_depth, test_depth), 'mean_map': metrics(mean_map, test_depth)}


def fit(train: dict, val: dict, alphas=ALPHAS) -> dict:
  """Ridge probe on `train`, α chosen on `val` (module docstring). Returns the probe:
  'mu' (P, 2F) per-position input means, 'sigma' (2F,), 'y_mean' (P, s²) the per-position
  mean depth (the bias), 'w' (2F, s²), 'clip' (lo, hi), 'alpha', 'val_rmse_per_alpha'."""
  n, p = train['patches'].shape[:2]
  chunks = list(_chunks(n, p))

  def rows(a, b):  # Inputs (B, P, 2F) and targets (B, P, s²) of images [a, b).
    return _rows(train, a, b).reshape(b - a, p, -1), _targets(train, a, b).reshape(b - a, p, -1)

  mu, y_mean = 0.0, 0.0
  for a, b in chunks:
    x, y = rows(a, b)
    mu, y_mean = mu + x.sum(0), y_mean + y.sum(0)
  mu, y_mean = mu / n, y_mean / n
  sq = 0.0
  for a, b in chunks:
    sq = sq + ((rows(a, b)[0] - mu) ** 2).sum((0, 1))
  sigma = np.sqrt(sq / (n * p)) + 1e-6  # Constant inputs stay harmless.
  gram, xty = 0.0, 0.0
  for a, b in chunks:
    x, y = rows(a, b)
    x = ((x - mu) / sigma).reshape(-1, mu.shape[1])
    gram = gram + x.T @ x
    xty = xty + x.T @ (y - y_mean).reshape(len(x), -1)
  evals, evecs = np.linalg.eigh(gram / (n * p))
  proj = evecs.T @ (xty / (n * p))  # (2F, s²) in the eigenbasis.
  depth = np.asarray(train['meta_depth'])
  probe = {
    'mu': mu,
    'sigma': sigma,
    'y_mean': y_mean,
    'clip': (float(depth.min()), float(depth.max())),
  }
  scores, best = {}, None
  for alpha in alphas:
    w = evecs @ (proj / (np.maximum(evals, 0.0) + alpha)[:, None])
    rmse = metrics(predict({**probe, 'w': w}, val), val['meta_depth'])['rmse']
    scores[float(alpha)] = rmse
    if best is None or rmse < best[0]:  # First minimum: ties go to the smaller α.
      best = (rmse, alpha, w)
  return {**probe, 'w': best[2], 'alpha': float(best[1]), 'val_rmse_per_alpha': scores}


def predict(probe: dict, feats: dict) -> np.ndarray:
  """Predicted depth maps (N, G·s, G·s) of a set's features."""
  n, p = feats['patches'].shape[:2]
  g, s = math.isqrt(p), math.isqrt(probe['w'].shape[1])
  out = []
  for a, b in _chunks(n, p):
    x = (_rows(feats, a, b).reshape(b - a, p, -1) - probe['mu']) / probe['sigma']
    y = x @ probe['w'] + probe['y_mean']
    out.append(np.clip(y, *probe['clip']).reshape(-1, s * s))
  return _untile(np.concatenate(out), g, s)


def evaluate(train: dict, val: dict, test: dict, alphas=ALPHAS) -> dict:
  """Fit on train, choose α on val, report on test: metrics, baselines, protocol."""
  probe = fit(train, val, alphas)
  g, s = _grid(train)
  return {
    **metrics(predict(probe, test), test['meta_depth']),
    'baselines': baselines(train['meta_depth'], test['meta_depth']),
    'alpha': probe['alpha'],
    'val_rmse_per_alpha': probe['val_rmse_per_alpha'],
    'protocol': {
      'version': VERSION,
      'probe': 'ridge regression per patch with a per-position bias (closed form)',
      'inputs': 'patch tokens + class tokens of 4 blocks spread over the depth, no final norm',
      'outputs_per_patch': s * s,
      'target_side': g * s,
      'alphas': [float(a) for a in alphas],
      'alpha_chosen_on': 'val',
      'num_train': len(train['patches']),
      'num_val': len(val['patches']),
      'num_test': len(test['patches']),
    },
  }
