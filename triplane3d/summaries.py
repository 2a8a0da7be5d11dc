"""What a run leaves for people to look at: TensorBoard events, metrics.jsonl, PNG grids.

Only process 0 writes. Image grids show, per example, one row of
input | rendered RGB | rendered depth | target RGB | target depth under a header row naming
the columns. Renders are small (32 px in the demo), so every tile is enlarged by an integer
nearest-neighbour factor to at least `MIN_TILE` pixels: pixels stay sharp squares instead of
being smoothed into something the model did not produce. Depths are drawn with `colorize_depth`
(a viridis-like colour map over the camera's fixed [near, far], the same in every grid, so
grids of different steps compare), explained by a colour bar on the right.
"""

from __future__ import annotations

import io
import json
import math

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from triplane3d.data import depth_format
from triplane3d.data.transforms import imagenet_denormalize

MIN_TILE = 128  # Smallest side, in pixels, of a tile in a grid.
COLUMNS = ('input', 'RGB', 'depth', 'target RGB', 'target depth')

# Viridis (van der Walt & Smith, matplotlib's default colour map; released under CC0): its
# public 256-entry table sampled at 17 evenly spaced points and rounded to 8 bits, so these are
# approximate values. Linear interpolation between them stays within 6/255 of the full table
# per channel, and the luminance still rises monotonically from the first colour to the last
# (dark = near, bright = far), which keeps depth order readable in grey-scale prints too.
_VIRIDIS_ANCHORS = np.asarray(
  [
    (68, 1, 84),
    (72, 24, 106),
    (71, 45, 123),
    (66, 64, 134),
    (59, 82, 139),
    (51, 99, 141),
    (44, 114, 142),
    (38, 130, 142),
    (33, 145, 140),
    (31, 159, 136),
    (39, 173, 129),
    (61, 188, 116),
    (92, 200, 99),
    (129, 211, 77),
    (170, 220, 50),
    (213, 226, 26),
    (253, 231, 37),
  ],
  np.float64,
)
_INVALID = (0, 0, 0)  # Colour of NaN / Inf depths: black is not on the map.

# Grid layout, in pixels.
_GAP = 4  # Between tiles, and between the tiles and the colour bar.
_BAR_WIDTH = 16
_PAD = 4  # Around text.
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX's writer module imports torch whenever it is installed (the `dev` extra and the
  export path have it), only to accept torch tensors, which we never pass: ~3 s of every
  training process's start on 2 cores. A `None` entry in sys.modules makes that import fail
  as if torch were absent; tensorboardX then accepts numpy arrays, which is all we write.
  Nothing changes if torch is already imported.
  """
  import sys

  if 'tensorboardX.writer' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']  # A later `import torch` (export, evaluation) works as usual.
  return SummaryWriter


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
      (self.workdir / 'images').mkdir(parents=True, exist_ok=True)
      self._tb = _summary_writer_class()(str(self.workdir / 'tb'))

  def forget_after(self, step: int) -> None:
    """Drops metrics.jsonl lines of steps after `step` (the checkpoint a run resumes from).

    A run that crashed after its last checkpoint logged steps that the resumed run computes
    again; keeping both would list those steps twice. The resumed run's values win; a window
    of `log_every_steps` that spans the resume averages only the steps run after it. The file
    is rewritten through a temporary file and renamed, so a crash here loses nothing.
    """
    path = self.workdir / 'metrics.jsonl'
    if not self.active or not path.exists():
      return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)['step'] <= step]
    if len(kept) == len(lines):
      return
    tmp = self.workdir / 'metrics.jsonl.tmp'
    tmp.write_text(''.join(ln + '\n' for ln in kept))
    tmp.replace(path)

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

  def close(self) -> None:
    if self.active:
      self._tb.close()


def colorize_depth(depth, near: float, far: float) -> np.ndarray:
  """Depth (H, W) or (H, W, 1) in scene units → uint8 (H, W, 3) viridis-like colours.

  `near` maps to the map's first (darkest) colour and `far` to its last (brightest); depths
  outside [near, far] are clipped to the ends, and NaN / Inf are drawn black. Pass the camera's
  fixed near / far (not the image's own range) so colours mean the same depth everywhere.
  """
  if not far > near:
    raise ValueError(f'colorize_depth needs far > near, got near={near}, far={far}.')
  d = depth_format.as_hw(depth, 'colorize_depth: depth')
  finite = np.isfinite(d)
  t = np.clip((np.where(finite, d, near) - near) / (far - near), 0.0, 1.0)
  xs = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
  rgb = np.stack([np.interp(t, xs, _VIRIDIS_ANCHORS[:, c]) for c in range(3)], axis=-1)
  rgb[~finite] = _INVALID
  return np.round(rgb).astype(np.uint8)


def upscale(image_hwc: np.ndarray, min_side: int = MIN_TILE) -> np.ndarray:
  """Nearest-neighbour enlargement by the smallest integer factor giving sides >= `min_side`.

  (H, W, C) → (k·H, k·W, C) with k = ceil(min_side / min(H, W)) (k = 1 when already large
  enough); every source pixel becomes a k × k block.
  """
  image_hwc = np.asarray(image_hwc)
  k = max(1, math.ceil(min_side / min(image_hwc.shape[:2])))
  return np.repeat(np.repeat(image_hwc, k, axis=0), k, axis=1)


def to_uint8(image_hwc) -> np.ndarray:
  """Float image in [0, 1] (values outside are clipped) → uint8."""
  return np.round(np.clip(np.asarray(image_hwc, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def _fit(image_hw3: np.ndarray, size: int) -> np.ndarray:
  """A uint8 (h, w, 3) image resized to (size, size, 3): nearest up, area-average down."""
  if image_hw3.shape[:2] == (size, size):
    return image_hw3
  up = min(image_hw3.shape[:2]) <= size
  method = Image.Resampling.NEAREST if up else Image.Resampling.BOX
  return np.asarray(Image.fromarray(image_hw3).resize((size, size), method))


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text)
  return right - left, bottom - top


def reconstruction_grid(
  images_bhw3, rgb_brr3, depth_brr1, target_rgb, target_depth, near: float, far: float
) -> np.ndarray:
  """Header row + one row per example: input | RGB | depth | target RGB | target depth.

  Tiles are the renders enlarged by an integer nearest-neighbour factor to at least
  `MIN_TILE` px (the input is resized to the same side); depths use `colorize_depth` over
  [near, far], and a colour bar with near / far labelled sits right of the rows.

  Args:
    images_bhw3: backbone inputs, ImageNet-normalised (B, S, S, 3).
    rgb_brr3, depth_brr1: the full renders (B, R, R, 3), (B, R, R, 1).
    target_rgb, target_depth: the targets, same shapes.
    near, far: the camera's depth range (scene units), the ends of the colour map.

  Returns:
    uint8 (H, W, 3) with H = header + B · tile + (B − 1) · gap, tile = k · R >= `MIN_TILE`.
  """
  rgb_brr3 = np.asarray(rgb_brr3)
  r = rgb_brr3.shape[1]
  tile = r * max(1, math.ceil(MIN_TILE / r))  # What `upscale` makes of an R × R render.
  rows = []
  for i in range(rgb_brr3.shape[0]):
    inp = imagenet_denormalize(images_bhw3[i])
    tiles = [
      _fit(to_uint8(inp), tile),
      upscale(to_uint8(rgb_brr3[i])),
      upscale(colorize_depth(depth_brr1[i], near, far)),
      upscale(to_uint8(target_rgb[i])),
      upscale(colorize_depth(target_depth[i], near, far)),
    ]
    rows.append(tiles)

  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  text_h = max(_text_size(probe, s)[1] for s in (*COLUMNS, '0.0'))
  header = text_h + 2 * _PAD
  near_label, far_label = f'near {near:.3g}', f'far {far:.3g}'
  label_w = max(_text_size(probe, s)[0] for s in (near_label, far_label)) + 2 * _PAD
  n = len(rows)
  body_w = len(COLUMNS) * tile + (len(COLUMNS) - 1) * _GAP
  body_h = n * tile + (n - 1) * _GAP
  width = body_w + _GAP + _BAR_WIDTH + label_w
  canvas = np.full((header + body_h, width, 3), _BACKGROUND, np.uint8)

  for r, tiles in enumerate(rows):
    top = header + r * (tile + _GAP)
    for c, t in enumerate(tiles):
      left = c * (tile + _GAP)
      canvas[top : top + tile, left : left + tile] = t

  # The colour bar spans the rows: far (last colour) at the top, near at the bottom.
  ramp = np.linspace(far, near, body_h)[:, None].repeat(_BAR_WIDTH, axis=1)
  canvas[header:, body_w + _GAP : body_w + _GAP + _BAR_WIDTH] = colorize_depth(ramp, near, far)

  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for c, name in enumerate(COLUMNS):
    w, _ = _text_size(draw, name)
    left, top = draw.textbbox((0, 0), name)[:2]  # The default font draws below its origin.
    x = c * (tile + _GAP) + (tile - w) // 2 - left
    draw.text((x, _PAD - top), name, fill=_TEXT)
  label_x = body_w + _GAP + _BAR_WIDTH + _PAD
  top = draw.textbbox((0, 0), far_label)[1]
  draw.text((label_x, header - top), far_label, fill=_TEXT)
  draw.text((label_x, header + body_h - text_h - top), near_label, fill=_TEXT)
  return np.asarray(image)
