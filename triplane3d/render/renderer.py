"""The volume renderer (EG3D semantics, docs/method.md): one image, or a batch in chunks.

Per ray: stratified coarse depths with jitter → triplane lookup (mean of the three planes) →
point decoder → coarse march → importance sampling (no gradient through the positions) →
fine lookup → merge and co-sort coarse and fine samples → final march.

The point decoder is a pure function `decode_fn(mlp_params, feats_nc) -> (rgb_n3,
raw_sigma_n1)` with its parameter pytree, so this module stays free of Flax and gradients
flow to both the planes and the decoder parameters.

Memory: rays are rendered in chunks of `chunk` rays under `jax.lax.map` with each chunk
rematerialised (`jax.checkpoint`), so the backward pass holds one chunk's activations at a
time; `render_batch` keeps that bound for a whole batch (a step renders at most `chunk` rays,
not `chunk` rays of every image as under `vmap`). The random draws of a ray (coarse jitter,
importance draws) are keyed by its pixel index, so a pixel's output does not depend on the
chunk size nor on which other rays are rendered with it (a random subset renders exactly
what the full image shows there).

Key for shape suffixes: n rays, k samples per ray, c channels, h/w image rows/columns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

from triplane3d.render.camera import Camera, ray_table
from triplane3d.render.fused import LOOKUPS, fused_logits, point_outputs
from triplane3d.render.marching import activate_density, raymarch
from triplane3d.render.pdf import sample_pdf
from triplane3d.render.planes import TAPS, sample_planes_mean
from triplane3d.render.sampling import importance_bins, sort_by_depth, stratified_depths

SORTS = ('auto', 'rank', 'sort')
DecodeFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """Static rendering settings (hashable: usable as a static argument under `jax.jit`).

  Attributes:
    resolution: output images are resolution × resolution, one ray per pixel.
    num_coarse: stratified samples per ray (>= 4 when num_fine > 0).
    num_fine: importance samples per ray (0: coarse only).
    plane_axes: 'xyz' or 'eg3d' (see planes.py).
    plane_space: 'box' (EG3D: planes span the world box) or 'frustum' (planes span the
      camera's image coordinates and ray distance: `Camera.frustum_to_box`).
    white_background: composite onto white instead of black.
    chunk: rays per rematerialised chunk (per device, across a batch: `render_batch`); 0
      renders all rays at once (no remat).
    gpu_chunk: > 0: `chunk` on GPUs (0: `chunk` everywhere). Chosen when the program is
      lowered (`jax.lax.platform_dependent`), so one config serves TPU pods and GPU clusters
      and the fit check compiles each platform's program: GPUs pay per loop trip (host-launched
      kernels), TPUs per byte of memory (docs/performance.md, "The step on a GPU").
    rays_per_image: > 0: render only this many random rays per image (training).
    pdf_search: 'mask' or 'searchsorted' (see pdf.py).
    taps: how the plane lookup sums its 12 taps (planes.py).
    lookup: 'xla' (the lookup, then `decode_fn`) or 'pallas': the lookup and the point MLP
      in one kernel (fused.py; Triton on GPUs, interpreted elsewhere — for tests only), which
      computes `point_mlp`'s float32 outputs from `mlp_params` and does not call `decode_fn`.
    sort: how coarse and fine samples are merged by depth: 'rank' (`sampling.sort_by_depth`,
      comparisons only), 'sort' (`jax.lax.sort`) or 'auto' (the sort on GPUs, 'rank'
      elsewhere: `_co_sort`); the same numbers.
    camera: the fixed camera (sample range, box and rays come from it).
  """

  resolution: int = 256
  num_coarse: int = 16
  num_fine: int = 16
  plane_axes: str = 'xyz'
  plane_space: str = 'box'
  white_background: bool = False
  chunk: int = 8192
  gpu_chunk: int = 0
  rays_per_image: int = 0
  pdf_search: str = 'mask'
  taps: str = 'auto'
  lookup: str = 'xla'
  sort: str = 'auto'
  camera: Camera = dataclasses.field(default_factory=Camera)

  def __post_init__(self):
    if self.num_coarse < (4 if self.num_fine > 0 else 2):
      raise ValueError(
        f'render.num_coarse={self.num_coarse} is too small for render.num_fine='
        f'{self.num_fine}: importance sampling needs at least 4 coarse samples (2 without it).'
      )
    if not 0 <= self.rays_per_image <= self.resolution**2:
      raise ValueError(
        f'render.rays_per_image must be in [0, render.resolution² = {self.resolution**2}], '
        f'got {self.rays_per_image}.'
      )
    if self.plane_space not in ('box', 'frustum'):
      raise ValueError(f"render.plane_space must be 'box' or 'frustum', got {self.plane_space!r}.")
    if self.taps not in TAPS:
      raise ValueError(f'render.taps must be one of {TAPS}, got {self.taps!r}.')
    if self.lookup not in LOOKUPS:
      raise ValueError(f'render.lookup must be one of {LOOKUPS}, got {self.lookup!r}.')
    if self.sort not in SORTS:
      raise ValueError(f'render.sort must be one of {SORTS}, got {self.sort!r}.')
    if self.chunk < 0:
      raise ValueError(f'render.chunk must be >= 0 (0: all rays at once), got {self.chunk}.')
    if self.gpu_chunk < 0:
      raise ValueError(
        f'render.gpu_chunk must be >= 0 (0: render.chunk on GPUs too), got {self.gpu_chunk}.'
      )

  @classmethod
  def from_config(cls, render_cfg: mlc.ConfigDict, camera: Camera) -> RenderOptions:
    """From the `render` config section and the one camera (`Camera.from_config`).

    A configured camera must keep its whole frustum inside the triplane box (checked here).
    """
    camera.check_frustum_in_box()
    lookup = str(render_cfg.get('lookup', 'xla'))
    if lookup == 'pallas' and str(render_cfg.get('mlp_dtype', 'float32')) != 'float32':
      raise ValueError(
        f"render.lookup='pallas' computes the point MLP in float32, but render.mlp_dtype="
        f"{render_cfg.mlp_dtype!r}: set render.mlp_dtype='float32' or render.lookup='xla'."
      )
    return cls(
      resolution=int(render_cfg.resolution),
      num_coarse=int(render_cfg.num_coarse),
      num_fine=int(render_cfg.num_fine),
      plane_axes=str(render_cfg.plane_axes),
      plane_space=str(render_cfg.plane_space),
      white_background=bool(render_cfg.white_background),
      chunk=int(render_cfg.chunk),
      gpu_chunk=int(render_cfg.get('gpu_chunk', 0)),
      rays_per_image=int(render_cfg.rays_per_image),
      pdf_search=str(render_cfg.pdf_search),
      taps=str(render_cfg.get('taps', 'auto')),
      lookup=lookup,
      sort=str(render_cfg.get('sort', 'auto')),
      camera=camera,
    )

  @property
  def num_samples(self) -> int:
    """Decoder queries per ray (coarse + fine)."""
    return self.num_coarse + self.num_fine


class RenderOutput(NamedTuple):
  """What `render_image` returns; every field is per rendered ray (n rays).

  rgb: (n, 3) composited colour in [0, 1] (up to the decoder's ±0.001 margin).
  depth: (n, 1) expected depth along the unit ray, clamped to the scene range [near, far]
    (`clip_to_scene`: straight-through gradient).
  opacity: (n, 1) accumulated opacity Σ weights.
  densities: (n, k) **activated** densities softplus(raw - 1) of every queried point
    (coarse and fine, sorted by depth): the non-negative densities the marcher integrates,
    for the L1 density loss L_norm.
  ray_indices: (n,) int32 row-major pixel index (row * resolution + column) of each ray; use
    `gather_pixels` to take the same pixels from targets.
  """

  rgb: jax.Array
  depth: jax.Array
  opacity: jax.Array
  densities: jax.Array
  ray_indices: jax.Array


def draw_rays(key: jax.Array, options: RenderOptions) -> jax.Array:
  """The (n,) int32 row-major pixel indices one image renders: `options.rays_per_image`
  distinct pixels drawn with `key`, or every pixel when that is 0."""
  num_pixels = options.resolution**2
  if options.rays_per_image:
    return jax.random.choice(key, num_pixels, (options.rays_per_image,), False).astype(jnp.int32)
  return jnp.arange(num_pixels, dtype=jnp.int32)


def gather_pixels(image_hwc: jax.Array, ray_indices: jax.Array) -> jax.Array:
  """Pixels of an (H, W, C) target at row-major `ray_indices` (n,) → (n, C)."""
  return image_hwc.reshape(-1, image_hwc.shape[-1])[ray_indices]


def to_image(values_nc: jax.Array, resolution: int) -> jax.Array:
  """(..., R², C) values of a full render → (..., R, R, C) image."""
  return values_nc.reshape(*values_nc.shape[:-2], resolution, resolution, values_nc.shape[-1])


def render_dtype(planes: jax.Array) -> jnp.dtype:
  """The dtype rendering computes in: the planes' promoted to at least float32."""
  return jnp.promote_types(planes.dtype, jnp.float32)


def _query(planes, mlp_params, origins_n3, dirs_n3, depths_nk, decode_fn, options):
  """Decodes the points origin + depth * dir: → (rgb (n, k, 3), raw (n, k))."""
  n, k = depths_nk.shape
  points_nk3 = origins_n3[:, None, :] + dirs_n3[:, None, :] * depths_nk[..., None]
  cam = options.camera
  points = points_nk3.reshape(n * k, 3)
  if options.plane_space == 'frustum':
    points = cam.frustum_to_box(points, xp=jnp)
  if options.lookup == 'pallas':
    logits = fused_logits(
      planes, points, mlp_params, cam.box_size, options.plane_axes, cam.box_center
    )
    rgb, raw = point_outputs(logits)
  else:
    feats = sample_planes_mean(
      planes, points, cam.box_size, options.plane_axes, cam.box_center, options.taps
    )
    rgb, raw = decode_fn(mlp_params, feats)
  # March in the planes' precision (float32, or float64 in tests) whatever decode_fn used.
  dtype = render_dtype(planes)
  return rgb.astype(dtype).reshape(n, k, 3), raw.astype(dtype).reshape(n, k)


def render_rays(planes, mlp_params, origins_n3, dirs_n3, jitter_nk, u_nk, *, decode_fn, options):
  """Renders n rays given their random draws (no chunking; `render_image` chunks this).

  Args:
    planes: (3, H, W, C) triplanes; mlp_params, decode_fn, options: as `render_image`.
    origins_n3, dirs_n3: ray origins and unit directions.
    jitter_nk: (n, num_coarse) uniform [0, 1) coarse jitter.
    u_nk: (n, num_fine) uniform [0, 1) importance draws.

  Returns:
    `(rgb (n, 3), depth (n, 1), opacity (n, 1), densities (n, num_coarse + num_fine))`, the
    fields of `RenderOutput`.
  """
  cam = options.camera
  query = functools.partial(_query, planes, mlp_params, origins_n3, dirs_n3)
  depths = stratified_depths(jitter_nk, *cam.sample_range)
  rgb, raw = query(depths, decode_fn, options)
  if options.num_fine > 0:
    _, _, coarse_w = raymarch(rgb, raw[..., None], depths[..., None])
    # No gradient through the sample positions (EG3D detaches them).
    bins, bin_w = importance_bins(depths, jax.lax.stop_gradient(coarse_w[..., 0]))
    fine = jax.lax.stop_gradient(sample_pdf(bins, bin_w, u_nk, options.pdf_search))
    rgb_f, raw_f = query(fine, decode_fn, options)
    # Coarse evaluations are reused: merge, then co-sort every payload by depth at once.
    cat = lambda x, y: jnp.concatenate([x, y], axis=1)  # noqa: E731
    key = cat(depths, fine)
    payloads = (cat(raw, raw_f), *(cat(rgb[..., i], rgb_f[..., i]) for i in range(3)))
    depths, (raw, r, g, b) = _co_sort(key, payloads, options.sort)
    rgb = jnp.stack([r, g, b], axis=-1)
  color, depth, weights = raymarch(rgb, raw[..., None], depths[..., None], options.white_background)
  depth = clip_to_scene(depth, cam.near, cam.far)
  return color, depth, jnp.sum(weights, axis=-2), activate_density(raw)


def _co_sort(key_nk, payloads, how: str):
  """`key_nk` sorted along axis 1 and `payloads` (each (n, k)) moved with it, as `how`
  (`RenderOptions.sort`) says: 'rank' (`sort_by_depth`), 'sort' (`jax.lax.sort`), or 'auto'
  — `jax.lax.sort` on GPUs, 'rank' elsewhere, chosen when the program is lowered. XLA:GPU
  compiles the rank merge's (n, k, k) comparisons very slowly: the ViT-B/14 step compiled for
  an H100 on a CPU took 93 s with the sort and 336 s with 'rank' (docs/performance.md)."""

  def by_rank():
    return sort_by_depth(key_nk, payloads)

  def by_sort():
    out = jax.lax.sort((key_nk, *payloads), dimension=1, num_keys=1)
    return out[0], tuple(out[1:])

  if how == 'auto':
    return jax.lax.platform_dependent(cuda=by_sort, rocm=by_sort, default=by_rank)
  return by_rank() if how == 'rank' else by_sort()


def clip_to_scene(depth: jax.Array, near: float, far: float) -> jax.Array:
  """Depth clamped to the scene range [near, far], with the gradient of the identity. Any shape.

  Targets lie in [near, far], but rays are sampled over the wider `Camera.sample_range` so
  that depth at `far` is reachable. Clamping returns to EG3D's semantics (its depth is clamped
  to its ray range, which is the scene range) and lets a background ray put its density
  anywhere beyond `far` instead of exactly at it. The gradient passes straight through, so an
  object pixel rendered as background (depth > far) still gets pulled towards its target; for
  a target at `far` the clamped error, and with it the gradient, is zero.
  """
  return depth + jax.lax.stop_gradient(jnp.clip(depth, near, far) - depth)


def _render_pixels(
  planes, mlp_params, k_draws, ray_indices, origins_r3, dirs_r3, *, decode_fn, options
):
  """Renders the pixels `ray_indices` (n,): their rays from the (R², 3) tables, their draws
  keyed by pixel index. → `render_rays`' tuple.

  Everything per ray is derived from the indices here, so a rematerialised chunk keeps only
  its (n,) indices for the backward pass, not its rays and draws.
  """
  # Draws keyed by pixel index: a pixel renders the same whether it is rendered alone, in a
  # random subset or in the full image, and whatever the chunk size or batch.
  draws = jax.vmap(
    lambda i: jax.random.uniform(jax.random.fold_in(k_draws, i), (options.num_samples,))
  )(ray_indices).astype(render_dtype(planes))
  jitter, u = draws[:, : options.num_coarse], draws[:, options.num_coarse :]
  return render_rays(
    planes,
    mlp_params,
    origins_r3[ray_indices],
    dirs_r3[ray_indices],
    jitter,
    u,
    decode_fn=decode_fn,
    options=options,
  )


def _by_platform(fn: Callable[..., Any], options: RenderOptions, arrays: dict, **static) -> Any:
  """`fn(**arrays, options=..., **static)` with `options.gpu_chunk` as the chunk on GPUs and
  `options.chunk` elsewhere: only the lowering platform's branch is compiled. Both branches
  render the same values (a ray's draws do not depend on its chunk)."""
  on = lambda o: lambda a: fn(**a, options=o, **static)  # noqa: E731
  gpu = on(dataclasses.replace(options, chunk=options.gpu_chunk, gpu_chunk=0))
  other = on(dataclasses.replace(options, gpu_chunk=0))
  return jax.lax.platform_dependent(arrays, cuda=gpu, rocm=gpu, default=other)


def render_image(
  planes: jax.Array,
  mlp_params: Any,
  key: jax.Array,
  *,
  decode_fn: DecodeFn,
  options: RenderOptions,
  ray_indices: jax.Array | None = None,
  rays: tuple[jax.Array, jax.Array] | None = None,
) -> RenderOutput:
  """Renders one image from its triplanes (deterministic given `key`).

  Args:
    planes: (3, H, W, C) triplane features (bfloat16 is promoted: rendering runs in float32;
      `lookup='pallas'` widens bfloat16 planes as it gathers them, to the same values).
    mlp_params: the pytree `decode_fn` takes.
    key: PRNG key for the ray subset, the coarse jitter and the importance draws.
    decode_fn: `(mlp_params, feats (m, C)) -> (rgb (m, 3), raw density (m, 1))`.
    options: static settings, `RenderOptions.from_config(cfg.render, camera)`.
    ray_indices: optional (n,) row-major pixel indices to render. Default: a random subset
      of `options.rays_per_image` pixels if that is > 0, else every pixel.
    rays: optional `(origins (R², 3), dirs (R², 3))` to use instead of the camera's ray table
      (e.g. novel views: a rotated camera's rays, without compiling again per pose). The sample
      range and the box still come from `options.camera`.

  Returns:
    A `RenderOutput` with n = number of rendered rays (see its docstring).
  """
  if options.gpu_chunk and options.gpu_chunk != options.chunk:
    arrays = dict(planes=planes, mlp_params=mlp_params, key=key, ray_indices=ray_indices, rays=rays)
    return _by_platform(render_image, options, arrays, decode_fn=decode_fn)
  if options.lookup != 'pallas':  # The kernel reads bfloat16 planes as they are (fused.py).
    planes = planes.astype(render_dtype(planes))
  k_rays, k_draws = jax.random.split(key)
  ray_indices = draw_rays(k_rays, options) if ray_indices is None else ray_indices
  ray_indices = ray_indices.astype(jnp.int32)
  n = ray_indices.shape[0]
  origins, dirs = ray_table(options.camera, options.resolution) if rays is None else rays
  tables = (jnp.asarray(origins, render_dtype(planes)), jnp.asarray(dirs, render_dtype(planes)))
  body = functools.partial(_render_pixels, decode_fn=decode_fn, options=options)

  chunk = options.chunk
  if not chunk or chunk >= n:
    outputs = body(planes, mlp_params, k_draws, ray_indices, *tables)
  else:
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    # Padded rays repeat ray 0 (a valid ray); their outputs are dropped below.
    chunks = jnp.concatenate([ray_indices, jnp.broadcast_to(ray_indices[:1], (pad,))])
    # prevent_cse=False is safe (and faster) inside a scan-like loop.
    remat_body = jax.checkpoint(body, prevent_cse=False)
    outputs = jax.lax.map(
      lambda idx: remat_body(planes, mlp_params, k_draws, idx, *tables),
      chunks.reshape(num_chunks, chunk),
    )
    outputs = tuple(y.reshape(num_chunks * chunk, *y.shape[2:])[:n] for y in outputs)
  rgb, depth, opacity, densities = outputs
  return RenderOutput(rgb, depth, opacity, densities, ray_indices)


def render_batch(
  planes_b: jax.Array,
  mlp_params: Any,
  key: jax.Array,
  *,
  decode_fn: DecodeFn,
  options: RenderOptions,
  batch_shards: int = 1,
) -> RenderOutput:
  """`render_image` over planes (B, 3, H, W, C), one key per image, `options.chunk` rays at a
  time per batch shard.

  `key`: the images' keys (B,), or one key, split into B (image i draws with
  `jax.random.split(key, B)[i]`). Per-image keys let an image draw the same rays whatever
  batch it is rendered in (gradient accumulation splits batches).

  `batch_shards`: how many contiguous slices of B the batch axis is split into over devices
  (data × fsdp; 1 unsharded). Each step renders the same slot of every slice side by side,
  so every device renders its own images and the loop over a slice's b = B / batch_shards
  images stays within the device (a loop over the global batch axis would gather the planes
  onto every device). B must be a multiple of it.

  Memory: the render's working set does not grow with B. With n rays per image (chunk: the
  platform's, `RenderOptions.gpu_chunk`), chunk < n
  renders a slice's images one after another (`lax.map`), each in rematerialised chunks
  (`render_image`); chunk >= n renders up to chunk // n whole images per slice and
  rematerialised step. What stays per image is its planes (float32 while rendering, as given with
  `lookup='pallas'`), its (n,)
  pixel indices and the per-ray outputs. `chunk=0` (or chunk >= b·n) renders every ray at
  once. Either way every image renders exactly what `render_image` renders for it.

  Returns a `RenderOutput` whose fields gain a leading batch axis B.
  """
  if options.gpu_chunk and options.gpu_chunk != options.chunk:
    arrays = dict(planes_b=planes_b, mlp_params=mlp_params, key=key)
    return _by_platform(
      render_batch, options, arrays, decode_fn=decode_fn, batch_shards=batch_shards
    )
  per_image = jax.random.key_data(key).ndim > 1  # Typed (B,) keys, or raw (B, 2).
  num_images = planes_b.shape[0]
  keys = key if per_image else jax.random.split(key, num_images)
  if batch_shards < 1 or num_images % batch_shards:
    raise ValueError(
      f'render_batch: the batch of {num_images} images does not split into batch_shards='
      f'{batch_shards} equal slices; pass a divisor of the batch (the data × fsdp devices).'
    )
  b = num_images // batch_shards
  render = functools.partial(render_image, decode_fn=decode_fn, options=options)
  one = lambda planes, k: render(planes, mlp_params, k)  # noqa: E731

  def step(planes, k):
    """One step renders one image (or a group of images) of every slice: (slices, ...)."""
    if planes.shape[0] > 1:
      return jax.vmap(one)(planes, k)
    # Not a size-1 vmap: its size-1 batch axes made XLA:CPU copy the point MLP's activations
    # into a transposed layout for the weight gradients (docs/performance.md, Optimisations).
    return jax.tree.map(lambda y: y[None], one(planes[0], k[0]))

  n = options.rays_per_image or options.resolution**2
  chunk = options.chunk
  if not chunk or chunk >= b * n:
    return step(planes_b, keys)
  # (B, ...) → (b, slices, ...): slot i of every slice; the sharded axis stays unlooped.
  to_slots = lambda x: jnp.swapaxes(x.reshape(batch_shards, b, *x.shape[1:]), 0, 1)  # noqa: E731
  xs = (to_slots(planes_b), to_slots(keys))
  if chunk < n:
    out = jax.lax.map(lambda x: step(*x), xs)
  else:
    # Whole images per step: as few steps as chunk // n images per step allow, the images
    # spread evenly over them (lax.map renders a remainder in a last, smaller vmapped step).
    steps = -(-b // (chunk // n))
    remat_step = jax.checkpoint(lambda x: step(*x), prevent_cse=False)
    group = -(-b // steps)
    out = jax.lax.map(remat_step, xs, batch_size=group if group > 1 else None)
  return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(num_images, *y.shape[2:]), out)
