"""The fused lookup + point-MLP kernel (render/fused.py), run by Pallas' interpreter on this CPU:
its logits against a float64 numpy reference, its gradients against float64 autodiff of the
unfused per-plane gathers and MLP, the renderer with render.lookup='pallas' against 'xla', and the GPU
program compiled for an H100 by the CUDA plugin (no GPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from test_renderer import AXES, OPTS, loss_fn, make_scene, np_bilinear, to64

from triplane3d.models.triplane import point_mlp
from triplane3d.render import Camera, RenderOptions, render_batch
from triplane3d.render.fused import fused_logits
from triplane3d.render.planes import sample_planes

# Triton's matmuls want power-of-two sizes >= 16: 16 channels and 16 hidden units.
C = F = 16


def np_logits(planes, params, points, box_size, axes, center):
  """float64: the mean of the three planes' bilinear features, then the MLP before its sigmoid."""
  unit = (points - np.asarray(center)) * 2 / box_size
  feats = sum(np_bilinear(planes[k], unit[:, a], unit[:, b]) for k, (a, b) in enumerate(AXES[axes]))
  hid = np.logaddexp(0, feats / 3 @ params['hidden']['kernel'] + params['hidden']['bias'])
  return hid @ params['out']['kernel'] + params['out']['bias']


def scene_and_points(seed, n, res=8):
  planes, params = make_scene(seed, channels=C, res=res, hidden=F)
  rng = np.random.default_rng(seed)
  # Inside and outside the box (zeros padding), and points on texel edges and the box faces.
  points = rng.uniform(-0.7, 0.7, (n, 3))
  points[: n // 4] = rng.choice([-0.5, -0.25, 0.0, 0.25, 0.5], (n // 4, 3))
  return planes, params, points.astype(np.float32)


@pytest.mark.parametrize(
  'axes,box,center', [('xyz', 1.0, (0, 0, 0)), ('eg3d', 1.2, (0.1, 0, -0.1))]
)
def test_logits_match_float64_reference(axes, box, center):
  planes, params, points = scene_and_points(1, 300)  # Not a multiple of the block: padded.
  got = jax.jit(
    lambda p, m, x: fused_logits(p, x, m, box, axes, center, block=64, precision='highest')
  )(planes, params, points)
  as64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)  # noqa: E731
  want = np_logits(as64(planes), as64(params), points.astype(np.float64), box, axes, center)
  assert got.shape == (300, 4)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert np.std(want[:, 0]) > 0.1  # Not a constant: the features matter.


def test_gradients_match_float64_autodiff_of_the_unfused_lookup():
  """The reference is plain autodiff of the per-plane gathers (`sample_planes`), not the
  custom backward of `sample_planes_mean`, whose scatter the kernel's backward shares."""
  planes, params, points = scene_and_points(2, 1500)  # Two backward programs of 1024 points.
  weights = np.random.default_rng(3).normal(size=(1500, 4))

  def loss(logits_fn):
    return lambda p, m: jnp.sum(jnp.sin(logits_fn(p, m)) * weights)

  def unfused(p, m):
    feats = sample_planes(p, jnp.asarray(points, p.dtype), 1.0, 'xyz').mean(-2)
    hid = jax.nn.softplus(feats @ m['hidden']['kernel'] + m['hidden']['bias'])
    return hid @ m['out']['kernel'] + m['out']['bias']

  fused = lambda p, m: fused_logits(p, points, m, 1.0, precision='highest')  # noqa: E731
  got = jax.jit(jax.grad(loss(fused), argnums=(0, 1)))(planes, params)
  with jax.enable_x64(True):
    want = jax.jit(jax.grad(loss(unfused), argnums=(0, 1)))(*to64((planes, params)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == np.float32 and g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
  assert np.abs(got[0]).max() > 0 and np.abs(got[1]['hidden']['kernel']).max() > 0


def test_bfloat16_planes_are_read_as_they_are():
  """bfloat16 planes give exactly what the same planes widened to float32 give (forward), and
  the float32 path's plane gradient rounded to bfloat16."""
  planes, params, points = scene_and_points(8, 1024)
  planes16 = planes.astype(jnp.bfloat16)
  weights = np.random.default_rng(9).normal(size=(1024, 4))
  f = lambda p: jnp.sum(fused_logits(p, points, params, 1.0) * weights)  # noqa: E731
  (v16, g16), (v32, g32) = (
    jax.jit(jax.value_and_grad(f))(p) for p in (planes16, planes16.astype(jnp.float32))
  )
  assert g16.dtype == jnp.bfloat16
  assert float(v16) == float(v32)
  np.testing.assert_array_equal(
    np.asarray(g16, np.float32), np.asarray(g32.astype(jnp.bfloat16), np.float32)
  )


def test_points_carry_no_gradient():
  planes, params, points = scene_and_points(4, 64)
  f = lambda x: jnp.sum(fused_logits(planes, x, params, 1.0))  # noqa: E731
  np.testing.assert_array_equal(jax.grad(f)(jnp.asarray(points)), 0.0)


@pytest.mark.parametrize('chunk,dtype', [(0, jnp.float32), (10, jnp.bfloat16)])
def test_render_with_the_pallas_lookup_equals_xla(chunk, dtype):
  planes, params = make_scene(5, channels=C, hidden=F)
  planes = planes.astype(dtype)  # bfloat16: 'xla' widens the planes first, 'pallas' in the kernel.
  key = jax.random.PRNGKey(6)
  results = []
  for lookup in ('xla', 'pallas'):
    opts = dataclasses.replace(OPTS, chunk=chunk, lookup=lookup)
    step = jax.jit(jax.value_and_grad(loss_fn(opts), argnums=(0, 1), has_aux=True))
    results.append(step(planes, params, key))
  ((_, want), want_grad), ((_, got), got_grad) = results
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
  assert 0.05 < float(np.mean(want.opacity)) < 0.95  # Neither empty nor opaque.
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    assert g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(
      g, w, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-3, atol=1e-4 * np.abs(w).max()
    )


def test_batch_of_whole_images_per_step_is_vmapped_kernels():
  """2 images of 36 rays, both in one render step: the kernels run under `vmap`."""
  scenes = [make_scene(s, channels=C, hidden=F) for s in (8, 9)]
  planes_b, params = jnp.stack([p for p, _ in scenes]), scenes[0][1]
  keys = jax.random.split(jax.random.key(11), 2)
  results = []
  for lookup in ('xla', 'pallas'):
    opts = dataclasses.replace(OPTS, chunk=80, lookup=lookup)

    def loss(planes_b, params, opts=opts):
      out = render_batch(planes_b, params, keys, decode_fn=point_mlp, options=opts)
      return jnp.sum(out.rgb) + jnp.sum(out.depth), out

    results.append(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(planes_b, params)
    )
  ((_, want), want_grad), ((_, got), got_grad) = results
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * np.abs(w).max())


def test_bad_settings_name_the_fix():
  with pytest.raises(ValueError, match=r"render\.lookup must be one of \('xla', 'pallas'\)"):
    RenderOptions(lookup='triton')
  planes, params = make_scene(7, channels=C, hidden=8)
  with pytest.raises(ValueError, match=r"render\.mlp_hidden to be a power of two >= 16.*'xla'"):
    fused_logits(planes, jnp.zeros((4, 3)), params, 1.0)
  with pytest.raises(ValueError, match='the planes have 32 channels but the point MLP takes 16'):
    fused_logits(jnp.zeros((3, 4, 4, 32)), jnp.zeros((4, 3)), make_scene(7, C, hidden=F)[1], 1.0)
  cfg = mlc.ConfigDict(
    dict(resolution=8, num_coarse=8, num_fine=8, plane_axes='xyz', plane_space='box')
  )
  cfg.update(white_background=False, chunk=0, rays_per_image=0, pdf_search='mask')
  cfg.update(lookup='pallas', mlp_dtype='bfloat16')
  with pytest.raises(ValueError, match=r"render\.mlp_dtype='float32' or render\.lookup='xla'"):
    RenderOptions.from_config(cfg, Camera())
  cfg.mlp_dtype = 'float32'
  assert RenderOptions.from_config(cfg, Camera()).lookup == 'pallas'


def test_compiles_for_an_h100_with_two_triton_kernels():
  """Lowered for 'cuda' the kernels are Triton calls, not the interpreter's loops; XLA:GPU
  (with Triton and ptxas) compiles the forward and backward for an H100 on this CPU."""
  from launch import fit

  (device,) = fit.topology_devices('h100:1')
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)  # noqa: E731
  params = {
    'hidden': {'kernel': spec(32, 64), 'bias': spec(64)},
    'out': {'kernel': spec(64, 4), 'bias': spec(4)},
  }

  def loss(planes, params, points):
    return jnp.sum(jnp.sin(fused_logits(planes, points, params, 2.0)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  lowered = step.lower(spec(3, 128, 128, 32), params, spec(4096, 3))
  text = lowered.as_text()
  assert text.count('__gpu$xla.gpu.triton') == 2  # The forward and the backward kernel.
  assert 'triplane_lookup_mlp' in text and 'triplane_lookup_mlp_bwd' in text
  # Not through the persistent cache: a compile-only client cannot load its entries back.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    compiled = lowered.compile({'xla_gpu_enable_triton_gemm': False})
  finally:
    jax.config.update('jax_enable_compilation_cache', cache)
  hlo = compiled.as_text()
  assert hlo.count('custom_call_target="__gpu$xla.gpu.triton"') == 2
  assert compiled.memory_analysis().temp_size_in_bytes > 0
