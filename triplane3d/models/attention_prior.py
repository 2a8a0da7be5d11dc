"""A camera-derived locality prior for the decoder's cross-attention (optional).

With one fixed camera, every triplane cell is seen by a known part of the image. In the box
plane space (EG3D's), a cell of the
xy plane at (x, y) projects near image point (cx + fx·x/z, cy + fy·y/z) for z around the box
centre; a cell of the xz plane at (x, z) projects exactly to image column u = cx + fx·x/z (any
row); a cell of the yz plane at (y, z) to image row v = cy + fy·y/z (any column). The paper's
decoder has to discover this correspondence from scratch: at initialisation the plane
embeddings attend almost uniformly to h, every plane cell receives the average token, and the
decoder learns the dataset's mean shape instead of reading the image (docs/reconstruction.md).

`camera_attention_bias` turns the correspondence into an additive attention-logit bias,
−d²/(2σ²) with d the image distance (in units of the image side) between a plane cell's
projection and a patch centre, over the coordinates the plane determines, and σ in patches
(`decoder.attention_prior_sigma`). The
class token gets bias 0. Content-based attention (q·k) is learnt on top of it.
"""

from __future__ import annotations

import functools

import numpy as np

from triplane3d.render.camera import Camera
from triplane3d.render.planes import PLANE_AXES


@functools.lru_cache(maxsize=16)
def camera_attention_bias(
  camera: Camera,
  plane_axes: str,
  low_res: int,
  grid: int,
  sigma_patches: float = 1.0,
  plane_space: str = 'box',
) -> np.ndarray:
  """Attention-logit bias (3·L², 1 + g²), float32, for L×L plane cells and a g×g patch grid.

  Rows follow the decoder's embedding order (plane, row, column); columns are [cls, patches in
  row-major order]. `sigma_patches`: the Gaussian's width in patches. `plane_space`: the
  renderer's ('box': cells are world points, projected; 'frustum': cells are image
  coordinates and ray distances already, `Camera.frustum_to_box`). The box space needs a
  camera looking down +z (identity rotation).
  """
  if plane_space == 'box' and not np.allclose(camera.rotation_matrix, np.eye(3)):
    raise ValueError(
      "decoder.attention_prior='camera' assumes a camera looking down +z (identity rotation); "
      "use decoder.attention_prior='none' with a rotated camera."
    )
  centres = (np.arange(low_res) + 0.5) / low_res * 2.0 - 1.0  # Cell centres in [-1, 1].
  col, row = np.meshgrid(centres, centres, indexing='xy')  # (L, L): width, height coordinates.
  box_c, half = np.asarray(camera.box_center, np.float64), camera.box_size / 2.0
  pos = np.asarray(camera.position, np.float64)
  patch = (np.arange(grid) + 0.5) / grid
  pu, pv = np.meshgrid(patch, patch, indexing='xy')  # (g, g) patch centres (u: column).
  pu, pv = pu.reshape(-1), pv.reshape(-1)
  if sigma_patches <= 0:
    raise ValueError(f'decoder.attention_prior_sigma must be > 0 (patches), got {sigma_patches}.')
  sigma = sigma_patches / grid
  rows = []
  for axes in PLANE_AXES[plane_axes]:
    image = {}  # Image coordinate (0: u, 1: v) each cell projects to, where the plane fixes it.
    if plane_space == 'frustum':  # Cells already are (u, v, distance) in [-1, 1].
      for axis, unit in zip(axes, (col, row)):
        if axis < 2:
          image[axis] = (unit + 1.0) / 2.0
    else:
      world = {axes[0]: box_c[axes[0]] + half * col, axes[1]: box_c[axes[1]] + half * row}
      z = world.get(2, np.full_like(col, box_c[2])) - pos[2]  # xy plane: the box centre's depth.
      if 0 in world:  # The plane fixes the image column.
        image[0] = camera.cx + camera.fx * (world[0] - pos[0]) / z
      if 1 in world:  # ... and / or the image row.
        image[1] = camera.cy + camera.fy * (world[1] - pos[1]) / z
    d2 = np.zeros((low_res * low_res, grid * grid))
    for axis, centre in ((0, pu), (1, pv)):
      if axis in image:
        d2 += np.square(image[axis].reshape(-1, 1) - centre[None])
    rows.append(-d2 / (2.0 * sigma**2))
  bias = np.concatenate(rows, axis=0)
  return np.concatenate([np.zeros((len(bias), 1)), bias], axis=1).astype(np.float32)
