"""Coarse depths and EG3D's importance-sampling inputs against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from triplane3d.render.pdf import sample_pdf
from triplane3d.render.sampling import (
  importance_bins,
  smooth_weights,
  sort_by_depth,
  stratified_depths,
)


def test_stratified_depths():
  jitter = np.random.default_rng(0).uniform(size=(5, 16))
  got = np.asarray(stratified_depths(jnp.asarray(jitter, jnp.float32), 1.5, 2.5))
  delta = 1.0 / 15
  want = np.array([[1.5 + i * delta + jitter[r, i] * delta for i in range(16)] for r in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.all(np.diff(got, axis=-1) > 0)  # Strata never overlap: depths stay sorted.
  draws = jax.random.uniform(jax.random.PRNGKey(0), (10_000, 16))
  d = np.asarray(stratified_depths(draws, 1.5, 2.5))
  assert d.min() >= 1.5 and d.max() < 2.5 + delta


def ref_smooth(w):
  """max_pool1d(2, stride 1, padding 1 with -inf) → avg_pool1d(2, stride 1) → + 0.01."""
  padded = np.concatenate([[-np.inf], w, [-np.inf]])
  mp = np.array([max(padded[i], padded[i + 1]) for i in range(len(padded) - 1)])
  return np.array([(mp[i] + mp[i + 1]) / 2 for i in range(len(mp) - 1)]) + 0.01


def test_smooth_weights_matches_reference_and_torch():
  w = np.random.default_rng(1).uniform(size=(4, 15))
  got = np.asarray(smooth_weights(jnp.asarray(w, jnp.float32)))
  np.testing.assert_allclose(got, np.stack([ref_smooth(r) for r in w]), rtol=1e-6)
  t = torch.from_numpy(w)[:, None]
  t = torch.nn.functional.max_pool1d(t, 2, 1, padding=1)
  t = torch.nn.functional.avg_pool1d(t, 2, 1)[:, 0] + 0.01
  np.testing.assert_allclose(got, t.numpy(), rtol=1e-6)


def test_importance_bins_reproduce_eg3d_sampling():
  rng = np.random.default_rng(2)
  depths = np.sort(rng.uniform(1.5, 2.5, size=(3, 10)), axis=-1)
  weights = rng.uniform(size=(3, 9))
  u = rng.uniform(size=(3, 12))
  bins, bin_w = importance_bins(jnp.asarray(depths), jnp.asarray(weights))
  assert bins.shape == (3, 8) and bin_w.shape == (3, 7)
  got = sample_pdf(bins, bin_w, jnp.asarray(u))
  # EG3D: all K - 1 midpoints as bins, smoothed weights[1:-1]; its sampler clamps the upper
  # index to len(weights), so with one bin too many the last midpoint is never reached.
  for r in range(3):
    mids = (depths[r, :-1] + depths[r, 1:]) / 2
    w = ref_smooth(weights[r])[1:-1] + 1e-5
    cdf = np.concatenate([[0.0], np.cumsum(w / w.sum())])
    for n in range(12):
      ind = int(np.sum(cdf <= u[r, n]))
      lo, hi = max(ind - 1, 0), min(ind, len(w))
      denom = cdf[hi] - cdf[lo]
      denom = 1.0 if denom < 1e-5 else denom
      want = mids[lo] + (u[r, n] - cdf[lo]) / denom * (mids[hi] - mids[lo])
      np.testing.assert_allclose(got[r, n], want, rtol=1e-5)
      assert want <= mids[-2]  # The quirk: never in the last coarse interval.


def test_sort_by_depth_is_a_stable_sort_with_its_gradient():
  rng = np.random.default_rng(5)
  # Sorted coarse + unsorted fine samples (2, 3 rays), with ties inside and across the groups.
  coarse = np.sort(rng.integers(0, 12, (2, 3, 8)), axis=-1).astype(np.float64)
  fine = rng.integers(0, 12, (2, 3, 6)).astype(np.float64)
  depths = np.concatenate([coarse, fine], axis=-1)
  assert any(len(set(r)) < len(r) for r in depths.reshape(-1, 14))  # There are ties.
  payloads = tuple(rng.normal(size=depths.shape) for _ in range(3))
  order = np.argsort(depths, axis=-1, kind='stable')
  with jax.enable_x64(True):
    got_d, got_p = jax.jit(sort_by_depth)(jnp.asarray(depths), tuple(map(jnp.asarray, payloads)))
    np.testing.assert_array_equal(got_d, np.take_along_axis(depths, order, -1))
    for g, p in zip(got_p, payloads):
      np.testing.assert_array_equal(g, np.take_along_axis(p, order, -1))
    # The gradient routes each slot's cotangent back to its sample (a permutation's inverse),
    # as jax.lax.sort's does (depths without ties here: lax.sort is not stable).
    depths = depths + rng.uniform(0, 1e-3, depths.shape)
    w = jnp.asarray(rng.normal(size=depths.shape))

    def loss(sort, depths, payloads):
      d, ps = sort(depths, payloads)
      return jnp.sum(w * d * d) + sum(jnp.sum(w * (i + 1) * p) for i, p in enumerate(ps))

    def lax_sort(d, ps):
      out = jax.lax.sort((d, *ps), dimension=-1, num_keys=1)
      return out[0], out[1:]

    args = (jnp.asarray(depths), tuple(map(jnp.asarray, payloads)))
    got = jax.grad(lambda *a: loss(sort_by_depth, *a), argnums=(0, 1))(*args)
    want = jax.grad(lambda *a: loss(lax_sort, *a), argnums=(0, 1))(*args)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w_)


def test_sort_by_depth_puts_nans_last_like_lax_sort():
  d = jnp.asarray([[3.0, np.nan, 1.0, 2.0, np.nan, 0.0, np.inf]])
  p = jnp.arange(7.0)[None]
  got_d, (got_p,) = sort_by_depth(d, (p,))
  np.testing.assert_array_equal(got_d, [[0.0, 1.0, 2.0, 3.0, np.inf, np.nan, np.nan]])
  np.testing.assert_array_equal(got_p, [[5.0, 2.0, 3.0, 0.0, 6.0, 1.0, 4.0]])
