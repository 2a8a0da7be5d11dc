"""Triplane lookup with the semantics of PyTorch `grid_sample` (docs/method.md).

World points are taken relative to the box centre and scaled by 2 / box_size, so the box
maps to [-1, 1]^3. Each plane is sampled bilinearly with zeros padding and
`align_corners=False`; the first plane coordinate indexes the width axis, the second the
height axis.

Plane orders (`plane_axes`):
  'xyz':  planes xy, xz, yz (three orthogonal planes; our default).
  'eg3d': planes xy, xz, zx (EG3D's known bug: the third plane repeats x instead of y).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# (first, second) world-axis index of each plane's (width, height) coordinate.
PLANE_AXES = {
  'xyz': ((0, 1), (0, 2), (1, 2)),
  'eg3d': ((0, 1), (0, 2), (2, 0)),
}


def plane_coords(
  points: jax.Array,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center: Sequence[float] = (0.0, 0.0, 0.0),
) -> jax.Array:
  """Normalised grid coordinates of world points on each plane.

  Args:
    points: (..., 3) world coordinates.
    box_size: side of the cubic volume the planes cover.
    plane_axes: 'xyz' or 'eg3d' (see module docstring).
    box_center: (3,) centre of the volume.

  Returns:
    (..., 3, 2) coordinates in [-1, 1] inside the box: [..., p, 0] indexes plane p's width
    axis, [..., p, 1] its height axis.
  """
  if plane_axes not in PLANE_AXES:
    raise ValueError(f'render.plane_axes must be one of {sorted(PLANE_AXES)}, got {plane_axes!r}.')
  center = jnp.asarray(box_center, points.dtype)
  unit = (points - center) * (2.0 / box_size)
  return jnp.stack([unit[..., list(ax)] for ax in PLANE_AXES[plane_axes]], axis=-2)


def _corners(grid_n2: jax.Array, h: int, w: int) -> tuple[jax.Array, jax.Array]:
  """The 4 bilinear taps of `grid_sample(zeros, align_corners=False)` on an (h, w) grid.

  Returns `(index (n, 4) int32 into the row-major h·w texels, weight (n, 4))`; taps outside
  the grid get weight 0 (zeros padding) and a clipped, valid index.
  """
  taps = bilinear_taps(grid_n2[:, 0], grid_n2[:, 1], h, w)
  return jnp.stack([i for i, _ in taps], axis=-1), jnp.stack([t for _, t in taps], axis=-1)


def bilinear_taps(
  gx: jax.Array, gy: jax.Array, h: int, w: int
) -> list[tuple[jax.Array, jax.Array]]:
  """`_corners` tap by tap, element-wise only (so a Triton kernel can use it too, render/fused.py):
  the 4 `(index, weight)` pairs, each shaped as `gx`, of coordinates `gx` (width) and `gy`
  (height) on an (h, w) grid."""
  # align_corners=False: -1 and +1 are the outer edges of the border texels.
  x = ((gx + 1.0) * w - 1.0) / 2.0
  y = ((gy + 1.0) * h - 1.0) / 2.0
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  taps = []
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      index = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      taps.append((index, jnp.where(valid, wx * wy, 0.0)))
  return taps


def _bilinear(plane_hwc: jax.Array, grid_n2: jax.Array) -> jax.Array:
  """`grid_sample(bilinear, zeros, align_corners=False)` of one (H, W, C) plane at (N, 2)."""
  h, w, c = plane_hwc.shape
  index, weight = _corners(grid_n2, h, w)
  flat = plane_hwc.reshape(h * w, c)
  out = jnp.zeros((grid_n2.shape[0], c), plane_hwc.dtype)
  for j in range(4):
    out = out + weight[:, j, None].astype(out.dtype) * jnp.take(flat, index[:, j], axis=0)
  return out


def _all_taps(planes_shape, coords_np2):
  """The 12 taps (4 per plane) into the flattened (3·H·W, C) planes: (n, 12) each."""
  _, h, w, _ = planes_shape
  taps = [_corners(coords_np2[:, p], h, w) for p in range(3)]
  index = jnp.concatenate([t[0] + p * h * w for p, t in enumerate(taps)], axis=-1)
  return index, jnp.concatenate([t[1] for t in taps], axis=-1)


TAPS = ('auto', 'fused', 'loop')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mean_lookup(planes: jax.Array, coords_np2: jax.Array, taps: str) -> jax.Array:
  """Mean over planes of `_bilinear`: (3, H, W, C), (n, 3, 2) → (n, C). `taps`: see
  `sample_planes_mean`."""
  _, h, w, c = planes.shape
  index, weight = _all_taps(planes.shape, coords_np2)
  flat = planes.reshape(3 * h * w, c)
  weight = (weight / 3.0).astype(planes.dtype)

  def add_tap(j, out):
    tap = jax.lax.dynamic_index_in_dim(index, j, axis=1, keepdims=False)
    wj = jax.lax.dynamic_index_in_dim(weight, j, axis=1, keepdims=False)
    return out + wj[:, None] * jnp.take(flat, tap, axis=0)

  zeros = jnp.zeros((coords_np2.shape[0], c), planes.dtype)

  def fused():
    # XLA:CPU fuses the 12 gathers and the sum into one pass over the (n, C) output: 3× faster
    # than the loop, which reads and writes the accumulator once per tap (docs/performance.md).
    out = zeros
    for j in range(12):
      out = add_tap(j, out)
    return out

  # The loop bounds what is live to one gathered (n, C) tap, where TPU's compiler might
  # materialise all 12. On a GPU each loop trip is a host-launched sequence of kernels: with
  # 4096-ray chunks the ViT-B/14 step launched ~364 000 kernels (docs/performance.md, "The step
  # on a GPU"), so GPUs take the fused sum, whose memory they have.
  looped = lambda: jax.lax.fori_loop(0, 12, add_tap, zeros)  # noqa: E731
  if taps == 'auto':
    return jax.lax.platform_dependent(cpu=fused, cuda=fused, rocm=fused, default=looped)
  return fused() if taps == 'fused' else looped()


def _mean_lookup_fwd(planes, coords_np2, taps):
  out = _mean_lookup(planes, coords_np2, taps)
  return out, (coords_np2, jnp.zeros((0,), planes.dtype), planes.shape)


def _mean_lookup_bwd(taps, res, g_nc):
  coords_np2, proto, shape = res
  grad = scatter_taps(shape, coords_np2, g_nc, taps).astype(proto.dtype)
  # No gradient w.r.t. the point positions: the renderer's sample positions carry none.
  return grad, jnp.zeros_like(coords_np2)


def scatter_taps(shape, coords_np2: jax.Array, g_nc: jax.Array, taps: str) -> jax.Array:
  """The planes' gradient of the tap mean (`_mean_lookup`) given its (n, C) gradient `g_nc`:
  each point's gradient, weighted as its 12 taps, added into (3, H, W, C) = `shape` zeros.

  Autodiff of 12 gathers transposes into 12 (n, C) update tensors and 12 plane-sized
  scatters, all live at once. 'loop' (and 'auto' on CPU and TPU): one accumulator, one tap's
  update at a time. 'fused' (and 'auto' on GPUs, see `_mean_lookup`): one scatter of all 12
  taps' (n, 12, C) updates (one kernel, 12× the updates live). Computes in `g_nc`'s dtype.
  """
  _, h, w, c = shape
  index, weight = _all_taps(shape, coords_np2)
  weight = (weight / 3.0).astype(g_nc.dtype)
  grad = jnp.zeros((3 * h * w, c), g_nc.dtype)

  def fused():
    updates = (weight[:, :, None] * g_nc[:, None, :]).reshape(-1, c)
    return grad.at[index.reshape(-1)].add(updates)

  def add_tap(j, grad):
    tap = jax.lax.dynamic_index_in_dim(index, j, axis=1, keepdims=False)
    wj = jax.lax.dynamic_index_in_dim(weight, j, axis=1, keepdims=False)
    return grad.at[tap].add(wj[:, None] * g_nc)

  looped = lambda: jax.lax.fori_loop(0, 12, add_tap, grad)  # noqa: E731
  if taps == 'auto':
    grad = jax.lax.platform_dependent(cuda=fused, rocm=fused, default=looped)
  else:
    grad = fused() if taps == 'fused' else looped()
  return grad.reshape(shape)


_mean_lookup.defvjp(_mean_lookup_fwd, _mean_lookup_bwd)


def sample_planes(
  planes: jax.Array,
  points: jax.Array,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center: Sequence[float] = (0.0, 0.0, 0.0),
) -> jax.Array:
  """Per-plane bilinear features of world points.

  Args:
    planes: (3, H, W, C) triplane features.
    points: (..., 3) world coordinates.
    box_size, plane_axes, box_center: see `plane_coords`.

  Returns:
    (..., 3, C) features of each point on each plane (zeros outside the box).
  """
  batch_shape = points.shape[:-1]
  coords_np2 = plane_coords(points, box_size, plane_axes, box_center).reshape(-1, 3, 2)
  feats = [_bilinear(planes[p], coords_np2[:, p]) for p in range(3)]
  return jnp.stack(feats, axis=-2).reshape(*batch_shape, 3, planes.shape[-1])


def sample_planes_mean(
  planes: jax.Array,
  points: jax.Array,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center: Sequence[float] = (0.0, 0.0, 0.0),
  taps: str = 'auto',
) -> jax.Array:
  """Mean over the three planes of `sample_planes`, without the (..., 3, C) intermediate.

  Args: as `sample_planes`, and `taps`, how the 12 bilinear taps (4 per plane) are summed:
    'fused' — as one expression (forward; XLA fuses the gathers and the sum) and one scatter
    (backward); 'loop' — a `fori_loop` over the taps in both passes, one tap's (n, C) at a
    time; 'auto' — 'fused' in both passes on GPUs, 'fused' forward and 'loop' backward on
    CPU, 'loop' in both on TPU (chosen per platform when the program is lowered). The values
    agree to rounding; the choice is speed against memory (docs/performance.md).

  Returns:
    (..., C) the average of the three plane features of each point.

  Differentiable w.r.t. `planes` only (the gradient w.r.t. `points` is zero: the renderer's
  sample positions carry no gradient); its backward pass scatter-adds into a single
  plane-sized accumulator ('loop': one tap at a time, which keeps the 2M-point lookup
  memory-lean).
  """
  batch_shape = points.shape[:-1]
  if taps not in TAPS:
    raise ValueError(f'render.taps must be one of {TAPS}, got {taps!r}.')
  coords_np2 = plane_coords(points, box_size, plane_axes, box_center).reshape(-1, 3, 2)
  return _mean_lookup(planes, coords_np2, taps).reshape(*batch_shape, planes.shape[-1])
