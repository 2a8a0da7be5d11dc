"""What a run leaves for people to look at: TensorBoard events, metrics.jsonl, PNG grids.

Only process 0 writes. Image grids show, per example, one row of
input | rendered RGB | rendered depth | target RGB | target depth; depths are drawn in
grey levels from near (white) to far (black).
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np
from etils import epath
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class Writer:
  """Scalars to TensorBoard and `<workdir>/metrics.jsonl`; images to TensorBoard and PNG.

  Paths go through `etils.epath`, so a `gs://` workdir works for the JSON lines and PNGs
  (TensorBoard event files on GCS need tensorboardX's cloud support installed).
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.workdir = epath.Path(workdir)
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter

      (self.workdir / 'images').mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.workdir / 'tb'))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.active:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    with (self.workdir / 'metrics.jsonl').open('a') as f:
      f.write(json.dumps({'step': step, **{k: float(v) for k, v in values.items()}}) + '\n')

  def image(self, step: int, grid_hw3: np.ndarray) -> str | None:
    """Writes a uint8 (H, W, 3) grid; returns the PNG path (process 0) or None."""
    if not self.active:
      return None
    path = self.workdir / 'images' / f'step_{step:07d}.png'
    buf = io.BytesIO()
    Image.fromarray(grid_hw3).save(buf, format='PNG')
    path.write_bytes(buf.getvalue())
    self._tb.add_image('reconstructions', grid_hw3, step, dataformats='HWC')
    return str(path)

  def flush(self) -> None:
    if self.active:
      self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()


def _resize(img_hwc: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a float (h, w, c) image to (size, size, c)."""
  h, w = img_hwc.shape[:2]
  rows = (np.arange(size) * h // size).clip(0, h - 1)
  cols = (np.arange(size) * w // size).clip(0, w - 1)
  return img_hwc[rows][:, cols]


def reconstruction_grid(
  images_bhw3, rgb_brr3, depth_brr1, target_rgb, target_depth, near: float, far: float
) -> np.ndarray:
  """One row per example: input | RGB | depth | target RGB | target depth → uint8 (H, W, 3).

  Args:
    images_bhw3: backbone inputs, ImageNet-normalised (B, S, S, 3).
    rgb_brr3, depth_brr1: the full renders (B, R, R, 3), (B, R, R, 1).
    target_rgb, target_depth: the targets, same shapes.
    near, far: the depth range for the grey scale.
  """
  r = rgb_brr3.shape[1]

  def grey(d):
    g = 1.0 - (np.asarray(d, np.float32) - near) / (far - near)
    return np.repeat(np.clip(g, 0, 1), 3, axis=-1)

  rows = []
  for i in range(images_bhw3.shape[0]):
    inp = np.clip(np.asarray(images_bhw3[i]) * IMAGENET_STD + IMAGENET_MEAN, 0, 1)
    tiles = [
      _resize(inp, r),
      np.clip(np.asarray(rgb_brr3[i]), 0, 1),
      grey(depth_brr1[i]),
      np.asarray(target_rgb[i]),
      grey(target_depth[i]),
    ]
    rows.append(np.concatenate(tiles, axis=1))
  return (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
