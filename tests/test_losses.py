"""Each loss term against a numpy float64 computation on fixed inputs."""

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from triplane3d import losses


def _cfg(**kw):
  base = dict(rgb_weight=0.1, depth_weight=1.0, dist_weight=1.0, norm_weight=1e-3)
  return mlc.ConfigDict({**base, 'norm_reduction': 'mean', 'depth_loss': 'l2', **kw})


@pytest.fixture
def inputs():
  rng = np.random.default_rng(0)
  b, r, n, k = 2, 4, 5, 7
  idx = np.stack([rng.choice(r * r, n, replace=False) for _ in range(b)]).astype(np.int32)
  return dict(
    recon={
      'rgb': rng.uniform(size=(b, n, 3)).astype(np.float32),
      'depth': rng.uniform(1.5, 2.5, (b, n, 1)).astype(np.float32),
      'densities': rng.exponential(size=(b, n, k)).astype(np.float32),
      'ray_indices': idx,
    },
    batch={
      'rgb': rng.uniform(size=(b, r, r, 3)).astype(np.float32),
      'depth': rng.uniform(1.5, 2.5, (b, r, r, 1)).astype(np.float32),
    },
    hs=rng.normal(size=(b, 6, 8)).astype(np.float32),
    ht=rng.normal(size=(b, 6, 8)).astype(np.float32),
  )


def _numpy_terms(x, reduction, depth_loss='l2'):
  rec, bat = x['recon'], x['batch']
  b, r = bat['rgb'].shape[:2]
  rgb_t = np.stack([bat['rgb'][i].reshape(r * r, 3)[rec['ray_indices'][i]] for i in range(b)])
  dep_t = np.stack([bat['depth'][i].reshape(r * r, 1)[rec['ray_indices'][i]] for i in range(b)])
  f = np.float64
  dens = np.abs(rec['densities'].astype(f))
  norm = dens.mean() if reduction == 'mean' else dens.reshape(b, -1).sum(-1).mean()
  return {
    'rgb': np.mean((rec['rgb'].astype(f) - rgb_t) ** 2),
    'depth': np.mean(np.abs(rec['depth'].astype(f) - dep_t) ** (2 if depth_loss == 'l2' else 1)),
    'dist': np.mean((x['hs'].astype(f) - x['ht']) ** 2),
    'norm': norm,
    'psnr': 10 * np.log10(1 / np.mean((np.clip(rec['rgb'], 0, 1).astype(f) - rgb_t) ** 2)),
  }


@pytest.mark.parametrize('reduction, depth_loss', [('mean', 'l2'), ('sum', 'l2'), ('mean', 'l1')])
def test_terms_and_total_match_numpy(inputs, reduction, depth_loss):
  cfg = _cfg(norm_reduction=reduction, depth_loss=depth_loss)
  total, terms = losses.objective(
    inputs['recon'], inputs['batch'], jnp.asarray(inputs['hs']), jnp.asarray(inputs['ht']), cfg
  )
  want = _numpy_terms(inputs, reduction, depth_loss)
  for k, v in want.items():
    np.testing.assert_allclose(float(terms[k]), v, rtol=1e-5, err_msg=k)
  want_total = 0.1 * want['rgb'] + want['depth'] + want['dist'] + 1e-3 * want['norm']
  np.testing.assert_allclose(float(total), want_total, rtol=1e-5)


def test_absent_terms_are_zero(inputs):
  recon = {k: v for k, v in inputs['recon'].items() if k != 'densities'}
  total, terms = losses.objective(recon, inputs['batch'], inputs['hs'], None, _cfg())
  assert float(terms['dist']) == 0 and float(terms['norm']) == 0
  np.testing.assert_allclose(float(total), 0.1 * float(terms['rgb']) + float(terms['depth']))


def test_bad_reduction(inputs):
  with pytest.raises(ValueError, match='norm_reduction'):
    losses.density_l1(inputs['recon']['densities'], 'median')
  with pytest.raises(ValueError, match='depth_loss'):
    losses.depth_error(inputs['recon']['depth'], inputs['recon']['depth'], 'huber')
