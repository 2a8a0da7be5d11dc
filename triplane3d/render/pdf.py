"""Inverse-cdf sampling of a piecewise-constant pdf, with EG3D's semantics (docs/method.md).

Two equal implementations of the cdf search, chosen by `search`:
  'searchsorted': `jnp.searchsorted(side='right')` + gathers (fast on CPU/GPU).
  'mask': a dense (..., N, M + 1) comparison mask reduced with max / min (no sort, no
    gather: what TPUs like). It relies on `bins` being sorted ascending, as depth bins are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-5


def pdf_cdf(weights: jax.Array) -> jax.Array:
  """(..., M) bin weights → (..., M + 1) cdf starting at 0, of pdf = (w + 1e-5) / Σ."""
  w = weights + _EPS
  pdf = w / jnp.sum(w, axis=-1, keepdims=True)
  cdf = jnp.cumsum(pdf, axis=-1)
  return jnp.concatenate([jnp.zeros_like(cdf[..., :1]), cdf], axis=-1)


def _search_sorted(bins, cdf, u):
  m = cdf.shape[-1] - 1

  def one(cdf_1d, u_1d):
    return jnp.searchsorted(cdf_1d, u_1d, side='right')

  flat = jax.vmap(one)(cdf.reshape(-1, m + 1), u.reshape(-1, u.shape[-1]))
  inds = flat.reshape(u.shape)
  below = jnp.maximum(inds - 1, 0)
  above = jnp.minimum(inds, m)
  take = lambda a, i: jnp.take_along_axis(a, i, axis=-1)  # noqa: E731
  return take(cdf, below), take(cdf, above), take(bins, below), take(bins, above)


def _search_mask(bins, cdf, u):
  # le[..., n, j]: cdf_j <= u_n. The last such j is the right-sided search index minus one.
  le = cdf[..., None, :] <= u[..., :, None]
  cdf_last = cdf[..., -1:]
  bins_last = bins[..., -1:]
  # cdf and bins are both nondecreasing, so the extreme values sit at the extreme indices.
  cdf_below = jnp.max(jnp.where(le, cdf[..., None, :], -jnp.inf), axis=-1)
  bins_below = jnp.max(jnp.where(le, bins[..., None, :], -jnp.inf), axis=-1)
  # Past the last cdf value (u >= cdf[M] by rounding) the upper end clamps to index M.
  cdf_above = jnp.min(jnp.where(le, cdf_last[..., None, :], cdf[..., None, :]), axis=-1)
  bins_above = jnp.min(jnp.where(le, bins_last[..., None, :], bins[..., None, :]), axis=-1)
  return cdf_below, cdf_above, bins_below, bins_above


def sample_pdf(
  bins: jax.Array, weights: jax.Array, u: jax.Array, search: str = 'mask'
) -> jax.Array:
  """Draws samples from the piecewise-constant pdf given by `weights` on `bins`.

  Args:
    bins: (..., M + 1) bin edges, sorted ascending.
    weights: (..., M) non-negative bin weights (1e-5 is added to each).
    u: (..., N) uniform draws in [0, 1).
    search: 'mask' or 'searchsorted' (see module docstring); the results are equal.

  Returns:
    (..., N) samples: u located in the cdf (right-sided), then linearly interpolated inside
    its bin. Bins whose cdf width is below 1e-5 use denominator 1 (EG3D).
  """
  cdf = pdf_cdf(weights)
  if search == 'mask':
    cdf_lo, cdf_hi, bins_lo, bins_hi = _search_mask(bins, cdf, u)
  elif search == 'searchsorted':
    cdf_lo, cdf_hi, bins_lo, bins_hi = _search_sorted(bins, cdf, u)
  else:
    raise ValueError(f"render.pdf_search must be 'mask' or 'searchsorted', got {search!r}.")
  denom = cdf_hi - cdf_lo
  denom = jnp.where(denom < _EPS, 1.0, denom)
  return bins_lo + (u - cdf_lo) / denom * (bins_hi - bins_lo)
