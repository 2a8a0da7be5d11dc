"""Ray marching against a float64 numpy implementation of EG3D's MipRayMarcher, and analytic cases."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from triplane3d.render.marching import raymarch, softplus


def ref_raymarch(colors, densities, depths, white_background=False):
  """EG3D's marcher in float64 (transmittance as the exclusive product of 1 - alpha + 1e-10)."""
  deltas = depths[..., 1:, :] - depths[..., :-1, :]
  mid = lambda a: (a[..., :-1, :] + a[..., 1:, :]) / 2  # noqa: E731
  sigma = np.log1p(np.exp(mid(densities) - 1))
  alpha = 1 - np.exp(-sigma * deltas)
  shifted = np.concatenate([np.ones_like(alpha[..., :1, :]), 1 - alpha + 1e-10], axis=-2)
  weights = alpha * np.cumprod(shifted, axis=-2)[..., :-1, :]
  rgb = (weights * mid(colors)).sum(-2)
  total = weights.sum(-2)
  with np.errstate(invalid='ignore', divide='ignore'):
    depth = (weights * mid(depths)).sum(-2) / total
  depth = np.nan_to_num(depth, nan=np.inf)
  depth = np.clip(depth, depths.min(-2), depths.max(-2))
  if white_background:
    rgb = rgb + 1 - total
  return rgb, depth, weights


def random_rays(seed, shape=(5, 7), k=12):
  rng = np.random.default_rng(seed)
  colors = rng.uniform(size=(*shape, k, 3))
  densities = rng.normal(0, 3, size=(*shape, k, 1))
  depths = np.sort(rng.uniform(1.5, 2.5, size=(*shape, k, 1)), axis=-2)
  return colors, densities, depths


@pytest.mark.parametrize('white', [False, True])
def test_matches_reference(white):
  args = random_rays(0)
  got = raymarch(*(jnp.asarray(a, jnp.float32) for a in args), white_background=white)
  want = ref_raymarch(*args, white_background=white)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_opaque_slab_renders_its_depth_and_colour():
  k = 64
  depths = np.linspace(1.5, 2.5, k)[:, None]
  step = depths[1, 0] - depths[0, 0]
  slab = 2.1
  inside = depths >= slab
  densities = np.where(inside, 1e4, -1e4)  # Raw: softplus(-1e4 - 1) = 0; 1e4 is opaque.
  slab_rgb = np.array([0.2, 0.5, 0.9])
  colors = np.where(inside, slab_rgb, [1.0, 0.0, 0.0])
  rgb, depth, weights = raymarch(
    *(jnp.asarray(a, jnp.float32) for a in (colors, densities, depths))
  )
  # The interval entering the slab has midpoint raw density 0 (a thin haze, alpha a); the
  # next one is opaque and takes the rest of the weight.
  first = np.argmax(inside[:, 0])
  a = 1 - np.exp(-np.log1p(np.exp(-1.0)) * step)
  mid_enter = depths[first, 0] - step / 2
  np.testing.assert_allclose(depth, [a * mid_enter + (1 - a) * (mid_enter + step)], rtol=1e-6)
  assert abs(float(depth[0]) - slab) < 1.5 * step
  np.testing.assert_allclose(
    rgb, a * (slab_rgb + np.array([1.0, 0.0, 0.0])) / 2 + (1 - a) * slab_rgb, rtol=1e-5
  )
  np.testing.assert_allclose(np.sum(weights), 1.0, atol=5e-6)


def test_empty_space_renders_background():
  k = 16
  depths = jnp.linspace(1.5, 2.5, k)[:, None]
  densities = jnp.full((k, 1), -100.0)  # softplus(-101) ~ 1e-44: nothing there.
  colors = jnp.full((k, 3), 0.7)
  for white, bg in ((False, 0.0), (True, 1.0)):
    rgb, depth, weights = raymarch(colors, densities, depths, white_background=white)
    np.testing.assert_allclose(rgb, [bg] * 3, atol=1e-6)
    assert float(jnp.sum(weights)) < 1e-6
    # No weight at all: depth is +inf, clamped to the far end of the samples.
    assert float(depth[0]) <= 2.5 + 1e-6


def test_constant_density_closed_form_transmittance():
  k = 33
  raw = 1.7
  sigma = np.log1p(np.exp(raw - 1))
  depths = np.linspace(1.5, 2.5, k)[:, None]
  colors = np.ones((k, 3))
  rgb, _, weights = raymarch(
    jnp.asarray(colors, jnp.float32), jnp.full((k, 1), raw), jnp.asarray(depths, jnp.float32)
  )
  # T(t) = exp(-sigma (t - near)); interval i holds exp(-sigma t_i) - exp(-sigma t_{i+1}).
  t = depths[:, 0] - 1.5
  want_w = np.exp(-sigma * t[:-1]) - np.exp(-sigma * t[1:])
  np.testing.assert_allclose(weights[:, 0], want_w, rtol=1e-5)
  np.testing.assert_allclose(rgb, [1 - np.exp(-sigma * 1.0)] * 3, rtol=1e-5)


def test_gradients_match_finite_differences():
  colors, densities, depths = random_rays(1, shape=(3,), k=6)
  with jax.enable_x64(True):

    def f(c, d):
      rgb, depth, _ = raymarch(c, d, jnp.asarray(depths))
      return jnp.sum(rgb * jnp.arange(1.0, 4.0)) + jnp.sum(depth)

    jax.test_util.check_grads(
      jax.jit(f), (jnp.asarray(colors), jnp.asarray(densities)), order=1, modes=['rev'], eps=1e-6
    )


@pytest.mark.parametrize('raw', [-20.0, -40.0, -60.0, -80.0])
def test_nearly_empty_rays_have_finite_gradients_and_exact_depth(raw):
  """Regression: at raw ≈ -60 the accumulated weight is ~1e-27 > 0 and the gradient of the
  normalised depth overflowed float32 into NaN, which stopped training runs."""
  k = 6
  depths = jnp.linspace(1.5, 2.5, k)[:, None]
  colors = jnp.full((k, 3), 0.5)
  raws = jnp.full((k,), raw) + jnp.linspace(0.0, 1.0, k)

  def depth_of(r):
    return raymarch(colors, r[:, None], depths)[1].sum()

  g = jax.grad(depth_of)(raws)
  assert np.all(np.isfinite(np.asarray(g)))
  # The value still follows the equations (weighted mean of midpoints, or far if no weight).
  d = np.asarray(depths[:, 0], np.float64)
  r = np.asarray(raws, np.float64)
  mid_r, mid_d, delta = (r[1:] + r[:-1]) / 2, (d[1:] + d[:-1]) / 2, np.diff(d)
  sigma = np.logaddexp(0.0, mid_r - 1.0) * delta
  w = -np.expm1(-sigma) * np.exp(-(np.cumsum(sigma) - sigma))
  want = (w * mid_d).sum() / w.sum()
  np.testing.assert_allclose(float(depth_of(raws)), want, rtol=1e-5)


def test_empty_rays_render_far_without_gradient():
  depths = jnp.linspace(1.5, 2.5, 6)[:, None]
  raws = jnp.full((6,), -200.0)  # softplus underflows: no weight at all in float32.
  depth_of = lambda r: raymarch(jnp.full((6, 3), 0.5), r[:, None], depths)[1].sum()  # noqa: E731
  assert float(depth_of(raws)) == 2.5
  np.testing.assert_array_equal(np.asarray(jax.grad(depth_of)(raws)), 0.0)


def test_softplus_values_and_derivative():
  """Forward bit for bit `jax.nn.softplus` in float32; derivative the float64 sigmoid, at the
  tails too (where 1 + exp(x) overflows or underflows)."""
  x = np.concatenate([np.linspace(-120, 120, 2001), [-1e4, -200.0, 0.0, 200.0, 1e4]])
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_array_equal(softplus(x32), jax.nn.softplus(x32))
  assert np.isfinite(np.asarray(jax.grad(lambda v: jnp.sum(softplus(v)))(x32))).all()
  with jax.enable_x64():
    got = jax.vmap(jax.grad(softplus))(jnp.asarray(x))
  np.testing.assert_allclose(got, np.exp(-np.logaddexp(0.0, -x)), rtol=1e-13, atol=0)
