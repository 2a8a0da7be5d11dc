"""The full renderer against a float64 numpy pipeline written from docs/method.md ("The
renderer"), chunking, ray subsets, batching and gradients."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from triplane3d.configs import common
from triplane3d.models.triplane import PointMLP, point_mlp
from triplane3d.render import (
  Camera,
  RenderOptions,
  gather_pixels,
  render_batch,
  render_image,
  to_image,
)
from triplane3d.render.camera import ray_table
from triplane3d.render.renderer import clip_to_scene, render_rays

AUTO = jax.sharding.AxisType.Auto
AXES = {'xyz': ((0, 1), (0, 2), (1, 2)), 'eg3d': ((0, 1), (0, 2), (2, 0))}


# ------------------------------------------------------------------ numpy float64 reference.
def np_bilinear(plane, gx, gy):
  """grid_sample(bilinear, zeros, align_corners=False), vectorised over points."""
  h, w, _ = plane.shape
  x, y = ((gx + 1) * w - 1) / 2, ((gy + 1) * h - 1) / 2
  x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
  out = 0.0
  for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
    for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
      ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      out = out + (ok * wx * wy)[:, None] * plane[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
  return out


def np_mlp(params, feats):
  h = np.logaddexp(0, feats @ params['hidden']['kernel'] + params['hidden']['bias'])
  x = h @ params['out']['kernel'] + params['out']['bias']
  return 1 / (1 + np.exp(-x[:, 1:])) * 1.002 - 0.001, x[:, :1]


def np_march(colors, raw, depths, white):
  mid = lambda a: (a[:, :-1] + a[:, 1:]) / 2  # noqa: E731
  alpha = 1 - np.exp(-np.logaddexp(0, mid(raw) - 1) * np.diff(depths, axis=1))
  trans = np.cumprod(np.concatenate([np.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], 1), 1)
  w = alpha * trans[:, :-1]
  rgb = np.einsum('nk,nkc->nc', w, mid(colors))
  total = w.sum(1, keepdims=True)
  depth = np.clip(
    (w * mid(depths)).sum(1, keepdims=True) / total, depths.min(1)[:, None], depths.max(1)[:, None]
  )
  return rgb + (1 - total if white else 0), depth, w, total


def np_pdf(bins, weights, u):
  out = np.zeros_like(u)
  for r in range(len(u)):
    w = weights[r] + 1e-5
    cdf = np.concatenate([[0.0], np.cumsum(w / w.sum())])
    ind = np.sum(cdf[None] <= u[r][:, None], axis=1)
    lo, hi = np.maximum(ind - 1, 0), np.minimum(ind, len(w))
    denom = cdf[hi] - cdf[lo]
    denom = np.where(denom < 1e-5, 1.0, denom)
    out[r] = bins[r][lo] + (u[r] - cdf[lo]) / denom * (bins[r][hi] - bins[r][lo])
  return out


def np_render(planes, params, origins, dirs, jitter, u, opts):
  cam = opts.camera

  def query(t):
    pts = origins[:, None] + dirs[:, None] * t[..., None]
    unit = ((pts - np.asarray(cam.box_center)) * 2 / cam.box_size).reshape(-1, 3)
    feats = (
      sum(
        np_bilinear(planes[k], unit[:, a], unit[:, b])
        for k, (a, b) in enumerate(AXES[opts.plane_axes])
      )
      / 3
    )
    rgb, raw = np_mlp(params, feats)
    return rgb.reshape(*t.shape, 3), raw.reshape(t.shape)

  kc = opts.num_coarse
  start, end = cam.sample_range  # [near - margin, far + margin].
  delta = (end - start) / (kc - 1)
  t = start + np.arange(kc) * delta + jitter * delta
  rgb, raw = query(t)
  _, _, w, _ = np_march(rgb, raw, t, False)
  # EG3D: blur-pool, +0.01, all midpoints as bins with weights[1:-1].
  pad = np.pad(w, ((0, 0), (1, 1)), constant_values=-np.inf)
  mp = np.maximum(pad[:, :-1], pad[:, 1:])
  smooth = (mp[:, :-1] + mp[:, 1:]) / 2 + 0.01
  fine = np_pdf((t[:, :-1] + t[:, 1:]) / 2, smooth[:, 1:-1], u)
  rgb_f, raw_f = query(fine)
  t = np.concatenate([t, fine], 1)
  order = np.argsort(t, axis=1, kind='stable')
  t = np.take_along_axis(t, order, 1)
  raw = np.take_along_axis(np.concatenate([raw, raw_f], 1), order, 1)
  rgb = np.take_along_axis(np.concatenate([rgb, rgb_f], 1), order[..., None], 1)
  color, depth, _, total = np_march(rgb, raw, t, opts.white_background)
  depth = np.clip(depth, cam.near, cam.far)  # The scene range (renderer.clip_to_scene).
  return color, depth, total, np.logaddexp(0, raw - 1)


# ------------------------------------------------------------------------------- helpers.
def make_scene(seed, channels=4, res=8, hidden=8):
  """Random float32 planes (3, res, res, C) and PointMLP params (with a density bias)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  planes = jax.random.normal(k1, (3, res, res, channels))
  params = nn.unbox(jax.jit(PointMLP(hidden).init)(k2, jnp.zeros((1, channels))))['params']
  # A positive density bias so that the scene is neither empty nor fully opaque.
  params['out']['bias'] = params['out']['bias'].at[0].set(2.5)
  return planes, params


def to64(tree):
  """Call under jax.enable_x64: the same numbers in float64."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), tree)


# Jitted once per distinct options: tests that share options share the compilation.
render = jax.jit(render_image, static_argnames=('decode_fn', 'options'))
render_rays_jit = jax.jit(render_rays, static_argnames=('decode_fn', 'options'))
decode64 = functools.partial(point_mlp, dtype=jnp.float64)


# A unit box (the random test scene is half opaque in it) and a sampling margin, so that the
# reference also checks that samples span [near - margin, far + margin].
OPTS = RenderOptions(
  resolution=6, num_coarse=8, num_fine=6, chunk=0, camera=Camera(box_size=1.0, margin=0.1)
)


@pytest.mark.parametrize(
  'axes,white,search', [('xyz', False, 'mask'), ('eg3d', True, 'searchsorted')]
)
def test_render_rays_matches_float64_reference(axes, white, search):
  opts = dataclasses.replace(OPTS, plane_axes=axes, white_background=white, pdf_search=search)
  rng = np.random.default_rng(0)
  n = 20
  origins, dirs = (a[rng.choice(36, n, replace=False)] for a in ray_table(opts.camera, 6))
  jitter, u = rng.uniform(size=(n, 8)), rng.uniform(size=(n, 6))
  planes32, params32 = make_scene(1)
  with jax.enable_x64(True):
    planes, params = to64((planes32, params32))
    got = render_rays_jit(
      planes,
      params,
      *map(jnp.asarray, (origins, dirs, jitter, u)),
      decode_fn=decode64,
      options=opts,
    )
    want = np_render(
      np.asarray(planes), jax.tree.map(np.asarray, params), origins, dirs, jitter, u, opts
    )
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9)
  assert 0.05 < float(np.mean(want[2])) < 0.95  # The scene is neither empty nor opaque.
  if white:
    return
  # float32 stays close to the float64 reference as well.
  got32 = render_rays_jit(
    planes32,
    params32,
    *(jnp.asarray(a, jnp.float32) for a in (origins, dirs, jitter, u)),
    decode_fn=point_mlp,
    options=opts,
  )
  for g, w in zip(got32, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def loss_fn(opts):
  def loss(planes, params, key):
    out = render_image(planes, params, key, decode_fn=point_mlp, options=opts)
    value = jnp.sum(out.rgb * jnp.asarray([1.0, 2.0, 3.0])) + jnp.sum(out.depth)
    return value + jnp.sum(out.densities), out

  return loss


def test_chunked_equals_unchunked_outputs_and_gradients():
  planes, params = make_scene(2)
  key = jax.random.PRNGKey(3)
  outs, grads = [], []
  for chunk in (0, 10):  # 36 rays in chunks of 10: the last chunk is padded.
    opts = dataclasses.replace(OPTS, chunk=chunk)
    step = jax.jit(jax.value_and_grad(loss_fn(opts), argnums=(0, 1), has_aux=True))
    (_, out), grad = step(planes, params, key)
    outs.append(out)
    grads.append(grad)
  for a, b in zip(outs[0], outs[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads[0]))
  assert np.abs(grads[0][0]).max() > 0 and np.abs(grads[0][1]['hidden']['kernel']).max() > 0


def test_gradients_match_finite_differences():
  # Coarse samples only: importance-sample positions deliberately carry no gradient, so a
  # finite difference through them would differ by design.
  opts = dataclasses.replace(OPTS, resolution=3, num_fine=0, chunk=4)
  scene = make_scene(4, channels=2, res=4, hidden=4)
  with jax.enable_x64(True):
    planes, params = to64(scene)
    key = jax.random.PRNGKey(5)

    def f(planes, params):
      out = render_image(planes, params, key, decode_fn=decode64, options=opts)
      return jnp.sum(out.rgb * jnp.asarray([1.0, 2.0, 3.0])) + jnp.sum(out.depth)

    jax.test_util.check_grads(jax.jit(f), (planes, params), order=1, modes=['rev'], eps=1e-6)


def test_ray_subset_and_batch_render_what_the_full_image_shows():
  planes, params = make_scene(6)
  key = jax.random.PRNGKey(7)
  full = render(planes, params, key, decode_fn=point_mlp, options=OPTS)
  sub_opts = dataclasses.replace(OPTS, rays_per_image=10, chunk=4)
  sub = render(planes, params, key, decode_fn=point_mlp, options=sub_opts)
  idx = np.asarray(sub.ray_indices)
  assert idx.shape == (10,) and len(set(idx.tolist())) == 10 and idx.min() >= 0 and idx.max() < 36
  np.testing.assert_array_equal(full.ray_indices, np.arange(36))
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_allclose(getattr(sub, name), getattr(full, name)[idx], rtol=1e-5, atol=1e-6)
  # Targets taken with gather_pixels line up with the rendered pixels.
  image = to_image(full.rgb, 6)
  np.testing.assert_allclose(gather_pixels(image, sub.ray_indices), full.rgb[idx])
  again = render(planes, params, key, decode_fn=point_mlp, options=sub_opts)
  np.testing.assert_array_equal(again.rgb, sub.rgb)  # Deterministic given the key.
  # Batched: image b is render_image with the b-th split key.
  batched = jax.jit(render_batch, static_argnames=('decode_fn', 'options'))(
    jnp.stack([-planes, planes]), params, key, decode_fn=point_mlp, options=OPTS
  )
  assert batched.rgb.shape == (2, 36, 3) and batched.densities.shape == (2, 36, 14)
  one = render(planes, params, jax.random.split(key, 2)[1], decode_fn=point_mlp, options=OPTS)
  np.testing.assert_allclose(batched.depth[1], one.depth, rtol=1e-5)
  np.testing.assert_allclose(batched.rgb[1], one.rgb, rtol=1e-5)


def vmapped_render_batch(planes_b, params, keys, *, decode_fn, options):
  """The previous render_batch: render_image vmapped over the images (the reference)."""
  render = functools.partial(render_image, decode_fn=decode_fn, options=options)
  return jax.vmap(render, in_axes=(0, None, 0))(planes_b, params, keys)


def batch_loss(render_fn, opts):
  def loss(planes_b, params, keys):
    out = render_fn(planes_b, params, keys, decode_fn=point_mlp, options=opts)
    value = jnp.sum(out.rgb * jnp.asarray([1.0, 2.0, 3.0])) + jnp.sum(out.depth)
    return value + jnp.sum(out.opacity) + jnp.sum(jnp.sqrt(out.densities)), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@functools.lru_cache
def unchunked_reference(scene_seeds, key_seed, rays_per_image):
  """`batch_loss(vmapped_render_batch)` without ray chunks, on `make_scene` of each seed:
  ((loss, outputs), gradients) as numpy. The one reference of every chunk size: chunks change
  the result by rounding only (measured: at most 0.6 of the tolerances the tests use), and
  each reference is a compile of its own (~8 s), so it is computed once per worker."""
  scenes = [make_scene(s) for s in scene_seeds]
  planes_b = jnp.stack([p for p, _ in scenes])
  keys = jax.random.split(jax.random.key(key_seed), len(scene_seeds))
  opts = dataclasses.replace(OPTS, rays_per_image=rays_per_image, chunk=0)
  return jax.tree.map(
    np.asarray, batch_loss(vmapped_render_batch, opts)(planes_b, scenes[0][1], keys)
  )


# 36 rays per image (or 10 with rays_per_image=10), B = 3 images. The chunk sizes take every
# branch of render_batch: images one at a time in chunks that do and do not divide the ray
# count, one or two whole images per step (two leaves a one-image remainder), all at once.
@pytest.mark.parametrize(
  'rays_per_image,chunk',
  [(0, 12), (0, 10), (0, 36), (0, 80), (0, 0), (10, 5), (10, 4), (10, 25), (10, 30)],
)
def test_batch_in_chunks_equals_vmapped_render_image(rays_per_image, chunk):
  opts = dataclasses.replace(OPTS, rays_per_image=rays_per_image, chunk=chunk)
  scenes = [make_scene(s) for s in (8, 9, 10)]
  planes_b = jnp.stack([p for p, _ in scenes])
  params = scenes[0][1]
  keys = jax.random.split(jax.random.key(11), 3)
  (_, got), got_grad = batch_loss(render_batch, opts)(planes_b, params, keys)
  (_, want), want_grad = unchunked_reference((8, 9, 10), 11, rays_per_image)
  n = rays_per_image or 36
  assert got.rgb.shape == (3, n, 3) and got.densities.shape == (3, n, 14)
  np.testing.assert_array_equal(got.ray_indices, want.ray_indices)
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # Every image and the MLP get a gradient (none is dropped with a padded chunk or image).
  assert all(np.abs(got_grad[0][i]).max() > 0 for i in range(3))
  assert np.abs(got_grad[1]['hidden']['kernel']).max() > 0


@pytest.mark.parametrize('chunk', [10, 40])
def test_sharded_batch_renders_each_slice_on_its_own_devices(devices, chunk):
  # 8 images split over 4 devices, 2 per device: a step renders slot i of every device's
  # slice side by side, so the compiled step gathers no planes, and equals the vmapped render.
  mesh = jax.sharding.Mesh(np.asarray(devices[:4]), ('data',), axis_types=(AUTO,))
  by_image = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  opts = dataclasses.replace(OPTS, chunk=chunk)
  scenes = [make_scene(s) for s in range(12, 20)]
  planes_b = jax.device_put(jnp.stack([p for p, _ in scenes]), by_image)
  params = scenes[0][1]
  keys = jax.random.split(jax.random.key(21), 8)
  sharded = functools.partial(render_batch, batch_shards=4)
  step = batch_loss(sharded, opts)
  assert 'all-gather' not in step.lower(planes_b, params, keys).compile().as_text()
  (_, got), got_grad = step(planes_b, params, keys)
  (_, want), want_grad = unchunked_reference(tuple(range(12, 20)), 21, 0)
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='batch_shards=3'):
    render_batch(planes_b, params, keys, decode_fn=point_mlp, options=opts, batch_shards=3)


def exported_whiles(fn, platform, *args):
  """The number of `while` loops in `fn` lowered for `platform` (no such device needed)."""
  exported = jax.export.export(jax.jit(fn), platforms=(platform,))(*args)
  return exported.mlir_module().count('stablehlo.while')


def test_gpu_chunk_is_the_chunk_on_gpus_only():
  # 3 images of 36 rays: chunk=10 loops over images and chunks; chunk=80 renders two whole
  # images per step. Lowered for a platform, the program is that platform's chunk's program.
  scenes = [make_scene(s) for s in (8, 9, 10)]
  planes_b = jnp.stack([p for p, _ in scenes])
  params, keys = scenes[0][1], jax.random.split(jax.random.key(11), 3)
  small, big = dataclasses.replace(OPTS, chunk=10), dataclasses.replace(OPTS, chunk=80)
  both = dataclasses.replace(OPTS, chunk=10, gpu_chunk=80)

  def fwd(opts):
    return lambda *a: batch_loss_value(opts, *a)

  args = (planes_b, params, keys)
  whiles = {
    (name, platform): exported_whiles(fwd(opts), platform, *args)
    for name, opts, platform in (
      ('both', both, 'cuda'), ('big', big, 'cuda'), ('small', small, 'cuda'),
      ('both', both, 'tpu'), ('small', small, 'tpu'),
    )
  }  # fmt: skip
  assert whiles['both', 'cuda'] == whiles['big', 'cuda'] != whiles['small', 'cuda']
  assert whiles['both', 'tpu'] == whiles['small', 'tpu']
  # On this CPU it renders what chunk=10 renders (and so what every chunk renders).
  (_, got), got_grad = batch_loss(render_batch, both)(*args)
  (_, want), want_grad = batch_loss(render_batch, small)(*args)
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_array_equal(g, w)

  # render_image dispatches too (the evaluation's and the demo's single-image renders).
  def one(chunk, gpu_chunk=0):
    opts = dataclasses.replace(OPTS, chunk=chunk, gpu_chunk=gpu_chunk)
    return lambda p, m, k: render_image(p, m, k, decode_fn=point_mlp, options=opts).rgb

  one_args = (planes_b[0], params, keys[0])
  whiles = {
    (chunk, gpu_chunk, platform): exported_whiles(one(chunk, gpu_chunk), platform, *one_args)
    for chunk, gpu_chunk, platform in (
      (0, 10, 'cuda'), (10, 0, 'cuda'), (0, 0, 'cuda'), (0, 10, 'tpu'), (0, 0, 'tpu'),
    )
  }  # fmt: skip
  assert whiles[0, 10, 'cuda'] == whiles[10, 0, 'cuda'] != whiles[0, 0, 'cuda']
  assert whiles[0, 10, 'tpu'] == whiles[0, 0, 'tpu']
  with pytest.raises(ValueError, match=r'render\.gpu_chunk must be >= 0'):
    RenderOptions(gpu_chunk=-1)


def batch_loss_value(opts, planes_b, params, keys):
  out = render_batch(planes_b, params, keys, decode_fn=point_mlp, options=opts)
  return jnp.sum(out.rgb) + jnp.sum(out.depth)


def test_options_from_config_and_ray_table():
  cfg = common.get_base_config()
  camera = Camera.from_config(cfg.camera)
  opts = RenderOptions.from_config(cfg.render, camera)
  assert (opts.resolution, opts.num_coarse, opts.num_fine, opts.rays_per_image) == (256, 16, 16, 0)
  assert opts.camera == camera and hash(opts) == hash(RenderOptions.from_config(cfg.render, camera))
  origins, dirs = ray_table(camera, 4)
  want_o, want_d = camera.rays(4)
  np.testing.assert_array_equal(dirs, want_d.reshape(-1, 3))
  np.testing.assert_array_equal(origins, want_o.reshape(-1, 3))
  with pytest.raises(ValueError):
    RenderOptions(num_coarse=3, num_fine=4)
  assert opts.taps == 'auto' and (opts.chunk, opts.gpu_chunk) == (4096, 262144)
  cfg.render.taps = 'fused'
  assert RenderOptions.from_config(cfg.render, camera).taps == 'fused'
  with pytest.raises(ValueError, match=r'render\.taps must be one of'):
    RenderOptions(taps='gather')


@pytest.mark.parametrize('space', ['box', 'frustum'])
def test_frustum_space_reads_one_uv_texel_per_ray(space):
  # A uv plane holding an image at the render resolution, the other planes zero, an opaque
  # decoder whose colour is its input: in the frustum space each pixel's ray reads its own
  # texel at every sample, so the render is the image (÷ 3, the mean over planes). In the box
  # space rays cross texels as the depth grows and the render is a blend.
  r = 8
  image = np.random.default_rng(0).uniform(size=(r, r, 3))
  planes = np.zeros((3, r, r, 3))
  planes[0] = image

  def decode(params, feats):
    del params
    return feats, jnp.full((*feats.shape[:-1], 1), 50.0, feats.dtype)

  options = RenderOptions(resolution=r, num_coarse=8, num_fine=8, chunk=0, plane_space=space)
  with jax.enable_x64(True):
    out = render_image(
      jnp.asarray(planes), None, jax.random.key(0), decode_fn=decode, options=options
    )
    got = np.asarray(out.rgb).reshape(r, r, 3) * 3.0
  if space == 'frustum':
    np.testing.assert_allclose(got, image, atol=1e-9)
  else:
    assert np.abs(got - image).max() > 0.05


def test_depth_is_clamped_to_the_scene_range_with_a_straight_through_gradient():
  # Rays are sampled beyond [near, far] (the margin); depth returns to the scene range.
  d = jnp.asarray([1.40, 1.50, 2.00, 2.50, 2.58])
  out, vjp = jax.vjp(lambda x: clip_to_scene(x, 1.5, 2.5), d)
  np.testing.assert_allclose(out, [1.5, 1.5, 2.0, 2.5, 2.5])
  (grad,) = vjp(jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0]))
  np.testing.assert_allclose(grad, [1.0, 2.0, 3.0, 4.0, 5.0])  # Identity, also where clamped.
  # A background target at `far`: a render beyond `far` has zero squared error and gradient;
  # an object target nearer than `far` still pulls a render beyond `far` towards it.
  loss = lambda x, t: jnp.sum(jnp.square(clip_to_scene(x, 1.5, 2.5) - t))  # noqa: E731
  assert float(jax.grad(loss)(jnp.asarray([2.58]), 2.5)[0]) == 0.0
  assert float(jax.grad(loss)(jnp.asarray([2.58]), 2.0)[0]) == 1.0


def test_rendered_depth_stays_in_the_scene_range():
  planes, params = make_scene(6)
  out = render(planes, params, jax.random.PRNGKey(0), decode_fn=point_mlp, options=OPTS)
  cam = OPTS.camera
  assert cam.sample_range[0] < cam.near and cam.sample_range[1] > cam.far
  assert float(out.depth.min()) >= cam.near and float(out.depth.max()) <= cam.far


def test_sort_auto_is_the_sort_on_gpus_and_rank_elsewhere():
  # XLA:GPU compiles the rank merge very slowly (docs/performance.md, session 18): 'auto'
  # lowers to jax.lax.sort for GPUs and to the comparisons elsewhere, and both merges render
  # the same values and gradients.
  scenes = [make_scene(s) for s in (8, 9)]
  planes_b = jnp.stack([p for p, _ in scenes])
  params, keys = scenes[0][1], jax.random.split(jax.random.key(5), 2)
  by = {how: dataclasses.replace(OPTS, sort=how) for how in ('auto', 'rank', 'sort')}

  def sorts(how, platform):
    fn = lambda *a: batch_loss_value(by[how], *a)  # noqa: E731
    exported = jax.export.export(jax.jit(fn), platforms=(platform,))(planes_b, params, keys)
    return exported.mlir_module().count('stablehlo.sort')

  on_gpu = sorts('auto', 'cuda')
  assert on_gpu > 0 and on_gpu == sorts('sort', 'cuda')
  assert sorts('auto', 'tpu') == sorts('auto', 'cpu') == 0
  (_, want), want_grad = batch_loss(render_batch, by['sort'])(planes_b, params, keys)
  (_, got), got_grad = batch_loss(render_batch, by['rank'])(planes_b, params, keys)
  for name in ('rgb', 'depth', 'opacity', 'densities'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-7)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"render\.sort must be one of \('auto', 'rank', 'sort'\)"):
    RenderOptions(sort='bitonic')
