"""The fixed camera shared by the renderer, the synthetic scenes and depth normalisation.

3D-Prior renders every image from one camera (a viewer-centred representation), so ray
origins and directions are a single constant table. This module is the one place that
defines that camera; everything that renders or maps depth reads it from here (through
`Camera.from_config(config.camera)`).

Conventions (docs/method.md, "The camera and the box", with a diagram): OpenCV camera axes
(x right, y down, z forward), a camera-to-world pose, normalised intrinsics (fx, fy, cx, cy in
units of image size), pixel centres at (i + 0.5) / res, unit-length ray directions so that
depths are distances along the ray.

Default: camera at the world origin looking down +z, fx = fy = 1.5, cx = cy = 0.5. Scene
depths lie in [near, far] = [1.5, 2.5]; rays are sampled over [near − margin, far + margin]
= [1.4, 2.6], so that a target at `far` (every background pixel) is inside the sampled range.
The triplane volume is the axis-aligned box of side `box_size` = 2 centred at `box_center`
= (0, 0, 2): every ray stays inside it over the whole sampled range
(`check_frustum_in_box`; the corner rays reach 0.78 of the half-size at t = 2.6).

Why not the unit box: outside the box the plane lookup returns zeros, so every point there
decodes to one shared colour and density. With fx = 1.5, a unit box at z = 2 lets 61 % of the
rays leave it before `far` (corner rays at t ≈ 1.6), and a one-scene overfit stalls at a depth
error of 0.09 (0.03 with the box of side 2).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections as mlc
import numpy as np


@dataclasses.dataclass(frozen=True)
class Camera:
  """A pinhole camera with normalised intrinsics and a camera-to-world pose.

  Attributes:
    fx, fy, cx, cy: normalised intrinsics (focal lengths and principal point divided by the
      image width / height).
    near, far: the scene's depth range along each unit-length ray: depth targets are mapped
      into it and synthetic scenes live in it.
    margin: rays are sampled over [near − margin, far + margin] (`sample_range`). The
      renderer's depth is a weighted mean of interval midpoints, so a target at the very end of
      the sampled range (every background pixel sits at `far`) is out of reach on average: the
      margin keeps every target strictly inside.
    position: camera centre in world coordinates, (3,).
    rotation: camera-to-world rotation, row-major 3×3 as a flat 9-tuple (OpenCV axes).
    box_center: centre of the triplane volume in world coordinates, (3,).
    box_size: side length of the (cubic) triplane volume.
  """

  fx: float = 1.5
  fy: float = 1.5
  cx: float = 0.5
  cy: float = 0.5
  near: float = 1.5
  far: float = 2.5
  margin: float = 0.1
  position: tuple[float, float, float] = (0.0, 0.0, 0.0)
  rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
  box_center: tuple[float, float, float] = (0.0, 0.0, 2.0)
  box_size: float = 2.0

  def __post_init__(self):
    if not 0.0 < self.near - self.margin < self.far:
      raise ValueError(
        f'camera needs 0 < camera.near - camera.margin < camera.far, got camera.near='
        f'{self.near}, camera.far={self.far}, camera.margin={self.margin}.'
      )
    if self.margin < 0:
      raise ValueError(f'camera.margin must be >= 0, got {self.margin}.')
    if len(self.rotation) != 9 or len(self.position) != 3 or len(self.box_center) != 3:
      raise ValueError(
        'camera.rotation must have 9 entries, camera.position and camera.box_center 3 each.'
      )
    if self.box_size <= 0:
      raise ValueError(f'camera.box_size must be positive, got {self.box_size}.')
    r = self.rotation_matrix
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-5):
      raise ValueError('camera.rotation is not orthonormal; pass a proper rotation matrix.')

  @classmethod
  def from_config(cls, cfg: mlc.ConfigDict | Mapping[str, Any] | None) -> Camera:
    """Builds a camera from a ConfigDict / mapping; missing fields keep the defaults."""
    if cfg is None:
      return cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    items = dict(cfg.items()) if hasattr(cfg, 'items') else dict(cfg)
    unknown = set(items) - fields
    if unknown:
      raise ValueError(f'unknown camera fields {sorted(unknown)}; known: {sorted(fields)}.')
    kwargs = {k: (tuple(v) if isinstance(v, Sequence) else v) for k, v in items.items()}
    return cls(**kwargs)

  @property
  def sample_range(self) -> tuple[float, float]:
    """(start, end) of the ray samples: [near − margin, far + margin]."""
    return self.near - self.margin, self.far + self.margin

  def frustum_corners(self) -> np.ndarray:
    """World points (8, 3): the image corners' rays at both ends of `sample_range`.

    The sampled frustum is their convex hull (every pixel's ray lies between the corner rays),
    so it is inside a convex box exactly when these 8 points are.
    """
    dirs = self.directions(np.asarray([0.0, 1.0, 0.0, 1.0]), np.asarray([0.0, 0.0, 1.0, 1.0]))
    ts = np.asarray(self.sample_range)
    return (np.asarray(self.position) + ts[:, None, None] * dirs[None]).reshape(-1, 3)

  def check_frustum_in_box(self) -> None:
    """Raises ValueError unless every ray stays inside the triplane box over `sample_range`.

    Outside the box the plane lookup returns zeros, so every point there decodes to one shared
    colour and density: a ray that leaves the box early cannot place its depth (or its
    background) beyond the exit point.
    """
    rel = np.abs(self.frustum_corners() - np.asarray(self.box_center)) * (2.0 / self.box_size)
    worst = float(rel.max())
    if worst > 1.0:
      need = self.box_size * worst
      raise ValueError(
        f'the camera frustum leaves the triplane box: a corner ray at t in {self.sample_range} '
        f'reaches {worst:.3f}x the half-size of the box (side {self.box_size} at '
        f'{self.box_center}). Use camera.box_size >= {need:.3f}, move camera.box_center, '
        'or narrow the field of view (larger camera.fx / camera.fy).'
      )

  def frustum_to_box(self, points, xp=np):
    """Warps world points (..., 3) so that the sampled frustum fills the triplane box.

    The frustum-aligned plane space (`render.plane_space='frustum'`): a point maps to its
    image coordinates (u, v) under this camera and its distance t from the camera centre,
    each scaled to [-1, 1] over the image and `sample_range`, and then to the box point with
    those unit coordinates. The planes then index (u, v), (u, t) and (v, t): the first plane
    lines up with the image pixel for pixel, and a ray of this camera reads one texel of it
    along its whole length. In the box space (EG3D's, the default) a ray of a perspective
    camera crosses texels of the xy plane as z grows, by up to 60 % of its offset from the
    image centre over [1.4, 2.6]: a feature read from the image at one depth lands at another
    pixel at every other depth.

    Points behind the camera map outside the box (zero features). `xp`: numpy or jax.numpy.
    """
    rot = xp.asarray(self.rotation_matrix, points.dtype)
    cam = (points - xp.asarray(self.position, points.dtype)) @ rot  # World → camera: Rᵀ(p − c).
    z = cam[..., 2]
    safe_z = xp.where(z > 1e-6, z, 1.0)
    u = self.cx + self.fx * cam[..., 0] / safe_z
    v = self.cy + self.fy * cam[..., 1] / safe_z
    t = xp.sqrt(xp.sum(cam * cam, axis=-1))
    t0, t1 = self.sample_range
    unit = xp.stack([2.0 * u - 1.0, 2.0 * v - 1.0, 2.0 * (t - t0) / (t1 - t0) - 1.0], axis=-1)
    unit = xp.where((z > 1e-6)[..., None], unit, 2.0)  # Behind the camera: outside.
    half = self.box_size / 2.0
    return xp.asarray(self.box_center, points.dtype) + half * unit

  @property
  def rotation_matrix(self) -> np.ndarray:
    return np.asarray(self.rotation, np.float64).reshape(3, 3)

  def rays(self, height: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ray origins and unit directions for every pixel centre of an image.

    Args:
      height: image height in pixels.
      width: image width in pixels (defaults to `height`).

    Returns:
      `(origins_hw3, dirs_hw3)`, float64 numpy arrays of shape (height, width, 3), row-major
      pixel order (row i, column j).
    """
    width = height if width is None else width
    v = (np.arange(height, dtype=np.float64) + 0.5) / height
    u = (np.arange(width, dtype=np.float64) + 0.5) / width
    uu, vv = np.meshgrid(u, v, indexing='xy')  # (H, W): u varies along columns.
    dirs = self.directions(uu, vv)
    origins = np.broadcast_to(np.asarray(self.position, np.float64), dirs.shape).copy()
    return origins, dirs

  def directions(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unit world directions (..., 3) of the rays through normalised image points (u, v)."""
    dirs_cam = np.stack([(u - self.cx) / self.fx, (v - self.cy) / self.fy, np.ones_like(u)], -1)
    dirs = dirs_cam @ self.rotation_matrix.T
    return dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=8)
def ray_table(camera: Camera, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """The constant (origins (R², 3), dirs (R², 3)) float64 table, row-major pixel order.

  The camera is fixed, so every image of a resolution shares one table (cached here).
  """
  origins, dirs = camera.rays(resolution)
  return origins.reshape(-1, 3), dirs.reshape(-1, 3)
