"""The fixed camera shared by the renderer, the synthetic scenes and depth normalisation.

3D-Prior renders every image from one camera (a viewer-centred representation), so ray
origins and directions are a single constant table. This module is the one place that
defines that camera; everything that renders or maps depth reads it from here (through
`Camera.from_config(config.camera)`).

Conventions (SPEC.md §1, §3): OpenCV camera axes (x right, y down, z forward), a
camera-to-world pose, normalised intrinsics (fx, fy, cx, cy in units of image size), pixel
centres at (i + 0.5) / res, unit-length ray directions so that depths are distances along
the ray.

Default: camera at the world origin looking down +z, fx = fy = 1.5, cx = cy = 0.5. The
triplane volume is the axis-aligned box of side `box_size` centred at `box_center`
= (0, 0, 2); its front face (z = 1.5) fills the image, and rays are sampled between
near = 1.5 and far = 2.5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Camera:
  """A pinhole camera with normalised intrinsics and a camera-to-world pose.

  Attributes:
    fx, fy, cx, cy: normalised intrinsics (focal lengths and principal point divided by the
      image width / height).
    near, far: sampling range along each unit-length ray.
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
  position: tuple[float, float, float] = (0.0, 0.0, 0.0)
  rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
  box_center: tuple[float, float, float] = (0.0, 0.0, 2.0)
  box_size: float = 1.0

  def __post_init__(self):
    if not 0.0 < self.near < self.far:
      raise ValueError(f'camera needs 0 < near < far, got near={self.near}, far={self.far}.')
    if len(self.rotation) != 9 or len(self.position) != 3 or len(self.box_center) != 3:
      raise ValueError('camera rotation must have 9 entries, position and box_center 3 each.')
    if self.box_size <= 0:
      raise ValueError(f'box_size must be positive, got {self.box_size}.')
    r = self.rotation_matrix
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-5):
      raise ValueError('camera rotation is not orthonormal; pass a proper rotation matrix.')

  @classmethod
  def from_config(cls, cfg) -> Camera:
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
    dirs_cam = np.stack(
      [(uu - self.cx) / self.fx, (vv - self.cy) / self.fy, np.ones_like(uu)], axis=-1
    )
    dirs = dirs_cam @ self.rotation_matrix.T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origins = np.broadcast_to(np.asarray(self.position, np.float64), dirs.shape).copy()
    return origins, dirs

  def project(self, points_n3: np.ndarray) -> np.ndarray:
    """Projects world points to normalised image coordinates (u, v) in [0, 1]², shape (N, 2)."""
    cam = (np.asarray(points_n3, np.float64) - np.asarray(self.position)) @ self.rotation_matrix
    return np.stack(
      [self.fx * cam[:, 0] / cam[:, 2] + self.cx, self.fy * cam[:, 1] / cam[:, 2] + self.cy],
      axis=-1,
    )
