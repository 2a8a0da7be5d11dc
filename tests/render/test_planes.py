"""Triplane lookup against a float64 numpy grid_sample written from its definition, and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from triplane3d.render.planes import plane_coords, sample_planes, sample_planes_mean

CENTER = (0.1, -0.2, 2.0)
SIZE = 1.3
AXES = {'xyz': ((0, 1), (0, 2), (1, 2)), 'eg3d': ((0, 1), (0, 2), (2, 0))}


def ref_grid_sample(plane_hwc, gx, gy):
  """Bilinear, zeros padding, align_corners=False, one point at a time (float64)."""
  h, w, _ = plane_hwc.shape
  x = ((gx + 1) * w - 1) / 2  # Continuous pixel coordinate along the width.
  y = ((gy + 1) * h - 1) / 2
  i0, j0 = int(np.floor(y)), int(np.floor(x))
  out = np.zeros(plane_hwc.shape[-1])
  for i, wy in ((i0, 1 - (y - i0)), (i0 + 1, y - i0)):
    for j, wx in ((j0, 1 - (x - j0)), (j0 + 1, x - j0)):
      if 0 <= i < h and 0 <= j < w:
        out += wy * wx * plane_hwc[i, j]
  return out


def ref_sample_planes(planes, points, axes):
  out = np.zeros((len(points), 3, planes.shape[-1]))
  for n, p in enumerate(points):
    unit = (p - np.asarray(CENTER)) * 2 / SIZE
    for k, (a, b) in enumerate(AXES[axes]):
      out[n, k] = ref_grid_sample(planes[k], unit[a], unit[b])
  return out


def random_case(seed, n=200, h=5, w=7, c=4):
  rng = np.random.default_rng(seed)
  planes = rng.normal(size=(3, h, w, c))
  # Points inside and somewhat outside the box (zeros padding must show).
  points = np.asarray(CENTER) + rng.uniform(-0.7, 0.7, size=(n, 3)) * SIZE
  return planes, points


@pytest.mark.parametrize(
  'axes, taps', [('xyz', 'auto'), ('eg3d', 'auto'), ('xyz', 'fused'), ('xyz', 'loop')]
)
def test_sample_planes_matches_reference(axes, taps):
  planes, points = random_case(0)
  got = sample_planes(
    jnp.asarray(planes, jnp.float32), jnp.asarray(points, jnp.float32), SIZE, axes, CENTER
  )
  want = ref_sample_planes(planes, points, axes)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  mean = sample_planes_mean(
    jnp.asarray(planes, jnp.float32), jnp.asarray(points, jnp.float32), SIZE, axes, CENTER, taps
  )
  np.testing.assert_allclose(mean, want.mean(axis=1), rtol=1e-5, atol=2e-6)


def test_sample_planes_matches_torch_grid_sample():
  planes, points = random_case(1)
  coords = np.asarray(plane_coords(jnp.asarray(points), SIZE, 'xyz', CENTER), np.float64)
  want = []
  for k in range(3):
    inp = torch.from_numpy(planes[k]).permute(2, 0, 1)[None]  # (1, C, H, W)
    grid = torch.from_numpy(coords[:, k])[None, None]  # (1, 1, N, 2)
    out = torch.nn.functional.grid_sample(inp, grid, 'bilinear', 'zeros', align_corners=False)
    want.append(out[0, :, 0].T.numpy())
  got = sample_planes(
    jnp.asarray(planes, jnp.float32), jnp.asarray(points, jnp.float32), SIZE, 'xyz', CENTER
  )
  np.testing.assert_allclose(got, np.stack(want, axis=1), rtol=1e-5, atol=2e-6)


def test_batch_shape_is_kept():
  planes, points = random_case(2, n=24)
  got = sample_planes_mean(
    jnp.asarray(planes), jnp.asarray(points).reshape(2, 3, 4, 3), SIZE, 'xyz', CENTER
  )
  assert got.shape == (2, 3, 4, 4)
  assert sample_planes(jnp.asarray(planes), jnp.asarray(points).reshape(4, 6, 3), SIZE).shape == (
    4,
    6,
    3,
    4,
  )


def test_texel_centre_returns_the_texel():
  h, w = 4, 6
  planes = np.random.default_rng(3).normal(size=(3, h, w, 2))
  i, j = 1, 4  # A texel (row i, column j) on every plane.
  u = (2 * j + 1) / w - 1  # Its centre in grid coordinates (first = width axis).
  v = (2 * i + 1) / h - 1
  # xy plane: x -> u, y -> v; xz plane: x -> u, z -> v; yz plane: y -> u, z -> v.
  for k, point in enumerate([(u, v, -0.99), (u, -0.99, v), (-0.99, u, v)]):
    world = np.asarray(CENTER) + np.asarray(point) * SIZE / 2
    got = sample_planes(jnp.asarray(planes), jnp.asarray(world[None]), SIZE, 'xyz', CENTER)
    np.testing.assert_allclose(got[0, k], planes[k, i, j], rtol=1e-5)


def test_outside_the_box_is_zero():
  planes = jnp.ones((3, 4, 4, 2))
  far_away = jnp.asarray([[5.0, 5.0, 9.0]])
  assert np.all(np.asarray(sample_planes(planes, far_away, 1.0, 'xyz', (0, 0, 2))) == 0)


@pytest.mark.parametrize('taps', ['auto', 'fused', 'loop'])
def test_fused_mean_gradient_matches_autodiff_of_per_plane_lookup(taps):
  planes, points = random_case(4, n=64)
  pts = jnp.asarray(points, jnp.float32)
  cot = jnp.asarray(np.random.default_rng(5).normal(size=(64, 4)), jnp.float32)
  fused = jax.jit(
    jax.grad(lambda p: jnp.sum(cot * sample_planes_mean(p, pts, SIZE, 'eg3d', CENTER, taps)))
  )
  plain = jax.jit(
    jax.grad(lambda p: jnp.sum(cot * sample_planes(p, pts, SIZE, 'eg3d', CENTER).mean(-2)))
  )
  p = jnp.asarray(planes, jnp.float32)
  np.testing.assert_allclose(fused(p), plain(p), rtol=1e-5, atol=1e-6)
  # And the autodiff gradient is the exact transpose of the (linear) lookup.
  want = np.zeros_like(planes)
  for n, pt in enumerate(points):
    unit = (pt - np.asarray(CENTER)) * 2 / SIZE
    for k, (a, b) in enumerate(AXES['eg3d']):
      for idx in np.ndindex(planes.shape[1:3]):
        basis = np.zeros((*planes.shape[1:3], 1))
        basis[idx] = 1
        want[k][idx] += ref_grid_sample(basis, unit[a], unit[b])[0] * np.asarray(cot[n]) / 3
  np.testing.assert_allclose(fused(p), want, rtol=1e-5, atol=1e-6)


def test_unknown_taps_is_refused():
  with pytest.raises(ValueError, match=r'render\.taps must be one of'):
    sample_planes_mean(jnp.ones((3, 4, 4, 2)), jnp.zeros((1, 3)), SIZE, 'xyz', CENTER, 'gather')


@pytest.mark.parametrize('platform, loops', [('cuda', 0), ('rocm', 0), ('cpu', 1), ('tpu', 2)])
def test_auto_taps_per_platform(platform, loops):
  # 'auto': fused in both passes on GPUs, a loop backward on CPU, loops in both on TPU.
  planes, points = random_case(6, n=32)
  pts = jnp.asarray(points, jnp.float32)
  grad = jax.value_and_grad(
    lambda p: jnp.sum(sample_planes_mean(p, pts, SIZE, 'xyz', CENTER, 'auto'))
  )
  exported = jax.export.export(jax.jit(grad), platforms=(platform,))(
    jnp.asarray(planes, jnp.float32)
  )
  assert exported.mlir_module().count('stablehlo.while') == loops


@pytest.mark.parametrize('taps, loops', [('fused', 0), ('loop', 2)])
def test_taps_choose_the_program(taps, loops):
  """'fused' leaves no loop in the lookup's forward + backward; 'loop' one in each pass."""
  planes, points = random_case(6, n=32)
  pts = jnp.asarray(points, jnp.float32)
  grad = jax.value_and_grad(
    lambda p: jnp.sum(sample_planes_mean(p, pts, SIZE, 'xyz', CENTER, taps))
  )
  text = jax.jit(grad).lower(jnp.asarray(planes, jnp.float32)).as_text()
  assert text.count('stablehlo.while') == loops
