"""Triplane lookup with the semantics of PyTorch `grid_sample` (SPEC.md §3).

World points are taken relative to the box centre and scaled by 2 / box_size, so the box
maps to [-1, 1]^3. Each plane is sampled bilinearly with zeros padding and
`align_corners=False`; the first plane coordinate indexes the width axis, the second the
height axis.

Plane orders (`plane_axes`):
  'xyz':  planes xy, xz, yz (three orthogonal planes; our default).
  'eg3d': planes xy, xz, zx (EG3D's known bug: the third plane repeats x instead of y).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

# (first, second) world-axis index of each plane's (width, height) coordinate.
PLANE_AXES = {
  'xyz': ((0, 1), (0, 2), (1, 2)),
  'eg3d': ((0, 1), (0, 2), (2, 0)),
}


def plane_coords(
  points: jnp.ndarray,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center: Sequence[float] = (0.0, 0.0, 0.0),
) -> jnp.ndarray:
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
    raise ValueError(f'plane_axes must be one of {sorted(PLANE_AXES)}, got {plane_axes!r}.')
  center = jnp.asarray(box_center, points.dtype)
  unit = (points - center) * (2.0 / box_size)
  return jnp.stack([unit[..., list(ax)] for ax in PLANE_AXES[plane_axes]], axis=-2)


def _bilinear(plane_hwc: jnp.ndarray, grid_n2: jnp.ndarray) -> jnp.ndarray:
  """`grid_sample(bilinear, zeros, align_corners=False)` of one (H, W, C) plane at (N, 2)."""
  h, w, c = plane_hwc.shape
  # align_corners=False: -1 and +1 are the outer edges of the border texels.
  x = ((grid_n2[:, 0] + 1.0) * w - 1.0) / 2.0
  y = ((grid_n2[:, 1] + 1.0) * h - 1.0) / 2.0
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  flat = plane_hwc.reshape(h * w, c)
  out = jnp.zeros((grid_n2.shape[0], c), plane_hwc.dtype)
  # One corner at a time: each gather (and its scatter-add in the backward pass) is (N, C),
  # never (N, 4, C).
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)  # Zeros padding.
      idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      weight = jnp.where(valid, wx * wy, 0.0).astype(plane_hwc.dtype)
      out = out + weight[:, None] * jnp.take(flat, idx, axis=0)
  return out


def sample_planes(
  planes: jnp.ndarray,
  points: jnp.ndarray,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center: Sequence[float] = (0.0, 0.0, 0.0),
) -> jnp.ndarray:
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
  planes: jnp.ndarray,
  points: jnp.ndarray,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center: Sequence[float] = (0.0, 0.0, 0.0),
) -> jnp.ndarray:
  """Mean over the three planes of `sample_planes`, without the (..., 3, C) intermediate.

  Args: as `sample_planes`.

  Returns:
    (..., C) the average of the three plane features of each point.
  """
  batch_shape = points.shape[:-1]
  coords_np2 = plane_coords(points, box_size, plane_axes, box_center).reshape(-1, 3, 2)
  total = _bilinear(planes[0], coords_np2[:, 0])
  for p in (1, 2):
    total = total + _bilinear(planes[p], coords_np2[:, p])
  return (total / 3.0).reshape(*batch_shape, planes.shape[-1])
