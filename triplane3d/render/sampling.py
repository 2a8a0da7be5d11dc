"""Sample depths along rays: stratified coarse samples and EG3D's importance-sampling inputs.

See docs/method.md, "The renderer". Coarse depths are linspace(near, far, K) plus an
independent uniform jitter in [0, Δ) per sample, Δ = (far - near) / (K - 1) (as in EG3D, the
last sample may pass `far`). Importance sampling smooths the coarse weights (max-pool width 2
with padding 1, then average-pool width 2), adds 0.01, and samples the coarse midpoints as
bins with EG3D's weights[1:-1] (so the last coarse interval never receives fine samples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stratified_depths(jitter: jax.Array, near: float, far: float) -> jax.Array:
  """Jittered coarse depths.

  Args:
    jitter: (..., K) uniform draws in [0, 1), K >= 2 (drawn by the caller, so that the same
      rays get the same samples however they are chunked).
    near, far: the sampling range.

  Returns:
    (..., K) depths linspace(near, far, K) + jitter * Δ, Δ = (far - near) / (K - 1).
  """
  k = jitter.shape[-1]
  delta = (far - near) / (k - 1)
  return jnp.linspace(near, far, k, dtype=jitter.dtype) + jitter * delta


def smooth_weights(weights: jax.Array) -> jax.Array:
  """EG3D's blur-pool of coarse weights: max-pool(2, pad 1) → avg-pool(2) → + 0.01.

  Args:
    weights: (..., M) coarse interval weights.

  Returns:
    (..., M) smoothed weights: out_i = (max(w_{i-1}, w_i) + max(w_i, w_{i+1})) / 2 + 0.01,
    where a missing neighbour (the -inf padding of max-pool) drops out of the max.
  """
  left = jnp.concatenate([weights[..., :1], weights], axis=-1)  # max(w_{-1}, w_0) = w_0.
  right = jnp.concatenate([weights, weights[..., -1:]], axis=-1)
  pooled = jnp.maximum(left, right)  # (..., M + 1): max(w_{i-1}, w_i) for i = 0..M.
  return 0.5 * (pooled[..., :-1] + pooled[..., 1:]) + 0.01


def importance_bins(depths: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The (bins, weights) EG3D feeds to `sample_pdf` from a coarse pass.

  Args:
    depths: (..., K) sorted coarse depths, K >= 4.
    weights: (..., K - 1) coarse weights from `raymarch` (trailing unit axis removed).

  Returns:
    `(bins (..., K - 2), weights (..., K - 3))`: the first K - 2 coarse midpoints and the
    smoothed weights [1:-1]. EG3D passes all K - 1 midpoints with K - 3 weights; its
    sampler then only ever reads the first K - 2 midpoints, which is what we pass.
  """
  if depths.shape[-1] < 4:
    raise ValueError(f'importance sampling needs >= 4 coarse samples, got {depths.shape[-1]}.')
  mids = 0.5 * (depths[..., :-1] + depths[..., 1:])
  return mids[..., :-1], smooth_weights(weights)[..., 1:-1]


@jax.custom_vjp
def _permute(x: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
  """x[..., src]: slot p takes sample src[p]; dst is the inverse (sample i goes to dst[i])."""
  return jnp.take_along_axis(x, src, axis=-1)


def _permute_fwd(x, src, dst):
  return _permute(x, src, dst), dst


def _permute_bwd(dst, g):  # A permutation's transpose is its inverse: a gather, not a scatter.
  return jnp.take_along_axis(g, dst, axis=-1), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def sort_by_depth(
  depths: jax.Array, payloads: tuple[jax.Array, ...]
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Samples sorted by depth along the last axis, payloads moved with them, without a sort.

  Exactly a stable sort (ties keep their order): sample i goes to slot
  dst_i = #(d_l < d_i) + #(d_l = d_i, l < i) (S² comparisons per ray, no sort kernel), its
  inverse src selects each slot's sample, and every array is gathered with src; the gradient
  is the gather with dst (a permutation's transpose), not a scatter. A 32-wide multi-operand
  sort is a slow kernel on GPUs (the H100 profile: 27 ms of a 592 ms step,
  docs/performance.md).

  Args:
    depths: (..., S) depths; NaNs go last, as `jax.lax.sort` puts them.
    payloads: arrays (..., S) that travel with the depths (densities, colour channels).

  Returns:
    `(depths (..., S) non-decreasing, payloads (..., S) in the same order)`.
  """
  s = depths.shape[-1]
  # NaNs go last (after +inf): rank by (is NaN, depth), NaN depths compared as equal.
  nan = jnp.isnan(depths)
  key = jnp.where(nan, 0, depths)
  d_l, d_i = key[..., :, None], key[..., None, :]  # (..., S (l), S (i)).
  n_l, n_i = nan[..., :, None], nan[..., None, :]
  earlier = jnp.arange(s)[:, None] < jnp.arange(s)[None, :]
  before = (d_l < d_i) | ((d_l == d_i) & earlier)  # By depth, ties by index.
  dst = jnp.sum((~n_l & n_i) | ((n_l == n_i) & before), axis=-2, dtype=jnp.int32)
  hot = dst[..., :, None] == jnp.arange(s, dtype=jnp.int32)  # (..., S (i), S (slot)).
  src = jnp.sum(jnp.where(hot, jnp.arange(s, dtype=jnp.int32)[:, None], 0), axis=-2)
  return _permute(depths, src, dst), tuple(_permute(x, src, dst) for x in payloads)
