"""Inverse-cdf sampling against a float64 loop written from EG3D's definition, and statistics."""

import jax.numpy as jnp
import numpy as np
import pytest

from triplane3d.render.pdf import sample_pdf


def ref_sample_pdf(bins, weights, u):
  """One ray at a time: pdf = (w + 1e-5) / Σ, right-sided search, linear inside the bin."""
  out = np.zeros(u.shape)
  for r in np.ndindex(u.shape[:-1]):
    w = weights[r] + 1e-5
    cdf = np.concatenate([[0.0], np.cumsum(w / w.sum())])
    m = len(w)
    for n, un in enumerate(u[r]):
      ind = int(np.sum(cdf <= un))  # Right-sided: entries <= u come before it.
      lo, hi = max(ind - 1, 0), min(ind, m)
      denom = cdf[hi] - cdf[lo]
      denom = 1.0 if denom < 1e-5 else denom
      out[r][n] = bins[r][lo] + (un - cdf[lo]) / denom * (bins[r][hi] - bins[r][lo])
  return out


def random_case(seed, rays=(4, 3), m=9, n=20):
  rng = np.random.default_rng(seed)
  bins = np.sort(rng.uniform(1.5, 2.5, size=(*rays, m + 1)), axis=-1)
  weights = rng.uniform(size=(*rays, m)) * (rng.uniform(size=(*rays, m)) > 0.3)
  return bins, weights, rng.uniform(size=(*rays, n))


@pytest.mark.parametrize('search', ['mask', 'searchsorted'])
def test_matches_reference(search):
  bins, weights, u = random_case(0)
  got = sample_pdf(*(jnp.asarray(a, jnp.float32) for a in (bins, weights, u)), search=search)
  np.testing.assert_allclose(got, ref_sample_pdf(bins, weights, u), rtol=1e-5)


def test_search_forms_agree_including_edges():
  bins, weights, u = random_case(1, rays=(6,), m=7, n=40)
  weights[0] = 0.0  # A flat cdf: only the 1e-5 floor.
  weights[1, 2:] = 0.0
  cdf = np.concatenate([np.zeros((6, 1)), np.cumsum(weights + 1e-5, -1)], -1)
  cdf /= cdf[:, -1:]
  u[:, :8] = cdf[:, :8]  # u exactly on cdf knots (right-sided search matters).
  u[:, 8] = 1.0 - 1e-7  # Past the float32 end of the cdf.
  args = [jnp.asarray(a, jnp.float32) for a in (bins, weights, u)]
  mask = sample_pdf(*args, search='mask')
  sorted_ = sample_pdf(*args, search='searchsorted')
  np.testing.assert_allclose(mask, sorted_, rtol=1e-6, atol=0)


def test_samples_land_in_weighted_bins_and_follow_the_pdf():
  m = 8
  bins = np.array([1.5, 1.6, 1.65, 1.9, 2.0, 2.1, 2.3, 2.4, 2.5])
  weights = np.array([0.0, 2.0, 0.5, 0.0, 1.0, 3.0, 0.0, 1.5])
  n = 100_000
  u = np.random.default_rng(2).uniform(size=(1, n))
  for search in ('mask', 'searchsorted'):
    s = np.asarray(
      sample_pdf(jnp.asarray(bins[None]), jnp.asarray(weights[None]), jnp.asarray(u), search)
    )[0]
    assert np.all((s >= bins[0]) & (s <= bins[-1]))
    which = np.clip(np.searchsorted(bins, s, side='right') - 1, 0, m - 1)
    # Zero-weight bins only get the 1e-5 floor: expected ~0.1 of 100k samples each.
    assert np.sum(weights[which] == 0) <= 5
    counts = np.bincount(which, minlength=m)[weights > 0]
    pdf = (weights + 1e-5) / np.sum(weights + 1e-5)
    expected = n * pdf[weights > 0]
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 4 degrees of freedom is 18.5.
    # Inside a bin the inverse cdf is linear: samples are uniform within it.
    inner = s[which == 5]
    frac = (inner - bins[5]) / (bins[6] - bins[5])
    assert abs(np.mean(frac) - 0.5) < 0.01
