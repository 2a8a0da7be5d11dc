"""Helpers the Colab notebooks (launch/colab/) share: configs, inputs, PCA features, pictures.

The notebooks reuse the project's own code (`train.run`, `reconstruct.Reconstructor`,
`convert.load_backbone`); this module holds only what is specific to showing results in a
notebook. Pictures are composed with PIL (matplotlib is not a dependency) and shown with
`IPython.display`, so they render in Colab, Jupyter and headless runs alike.

  pca_rgb        patch features (N, D) → (h, w, 3) in [0, 1]: the first three principal
                 components as colours, the usual way to look at DINOv2 features
  patch_features a backbone's last-layer patch tokens of one image, (h·w, D) and (h, w)
  panel          captioned tiles side by side, one uint8 image
"""

from __future__ import annotations

import importlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections as mlc
import numpy as np
from PIL import Image, ImageDraw

from triplane3d import run_config, summaries
from triplane3d.data.transforms import imagenet_denormalize

TILE = 192  # Side of a panel tile in pixels: small renders are enlarged to about this.


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> mlc.ConfigDict:
  """A config from a module of `triplane3d.configs` ('demo', 'eval.synthetic') or a file.

  `spec` is 'NAME[:arg]' or 'path/to/file.py[:arg]' (`get_config(arg)`, as `--config=` takes
  it). `overrides` are dotted field paths → values ({'train.num_steps': 10}); like a
  `--config.x=y` override, an unknown field is a ValueError naming the closest valid ones.
  """
  path, *arg = spec.split(':', 1)
  if path.endswith('.py'):
    config = run_config._load(spec)
  else:
    config = importlib.import_module(f'triplane3d.configs.{path}').get_config(*arg)
  overrides = dict(overrides or {})
  for field in overrides:
    if error := run_config.unknown_field(config, field):
      raise ValueError(f'override {field!r} of config {spec!r}: {error}')
  return run_config.apply_overrides(config, overrides)


def pca_rgb(features_nd: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """The first three principal components of patch features as an RGB image.

  Args:
    features_nd: (N, D) features of N = h·w patches in row-major order.
    grid_hw: (h, w), the patch grid.

  Returns:
    float32 (h, w, 3) in [0, 1]: channel c is the projection on the c-th principal component
    (float64 SVD of the centred features), min-max scaled over the image; a component with
    no variance (fewer than 3 informative directions) is 0.5 everywhere. Each component's sign
    is fixed so that its largest-magnitude projection is positive, making the picture
    independent of the SVD's arbitrary signs.
  """
  x = np.asarray(features_nd, np.float64)
  h, w = grid_hw
  if x.ndim != 2 or x.shape[0] != h * w:
    raise ValueError(f'pca_rgb: features must be (h·w={h * w}, D), got {x.shape}.')
  x = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  proj = u[:, :3] * s[:3]
  out = np.full((h * w, 3), 0.5)
  scale = max(float(s[0]) if s.size else 0.0, 1e-30)
  for c in range(proj.shape[1]):
    p = proj[:, c]
    if s[c] <= 1e-6 * scale:  # Numerically no variance in this direction.
      continue
    p = p * np.sign(p[np.argmax(np.abs(p))])
    out[:, c] = (p - p.min()) / (p.max() - p.min())
  return out.reshape(h, w, 3).astype(np.float32)


def patch_features(model, params, image_ss3: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
  """A backbone's normed last-block patch tokens of one normalised image.

  Args:
    model, params: as `convert.load_backbone` returns them.
    image_ss3: (S, S, 3) ImageNet-normalised, S a multiple of the patch size.

  Returns:
    (features (h·w, D) float32, (h, w)) with h = w = S / patch size.
  """
  (tokens,) = model.apply(
    {'params': params}, np.asarray(image_ss3, np.float32)[None], n=1,
    method='get_intermediate_layers',
  )  # fmt: skip
  side = image_ss3.shape[0] // model.patch_size
  return np.asarray(tokens[0], np.float32), (side, image_ss3.shape[1] // model.patch_size)


def to_uint8(image) -> np.ndarray:
  """A picture as uint8 (H, W, 3): floats in [0, 1], uint8, or greyscale (H, W)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = summaries.to_uint8(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image


def input_uint8(image_ss3: np.ndarray) -> np.ndarray:
  """A normalised backbone input (S, S, 3) as the picture it shows, uint8."""
  return summaries.to_uint8(imagenet_denormalize(image_ss3))


def panel(tiles: Sequence[tuple[str, np.ndarray]], side: int = TILE) -> np.ndarray:
  """Captioned tiles in one row: uint8 (header + side, n · (side + gap) − gap, 3).

  Each tile (anything `to_uint8` takes) is resized to side × side, nearest-neighbour (render
  pixels and patches stay visible as blocks), under its caption.
  """
  gap, header = 6, 18
  canvas = np.full((header + side, len(tiles) * (side + gap) - gap, 3), 255, np.uint8)
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for i, (caption, tile) in enumerate(tiles):
    x = i * (side + gap)
    resized = Image.fromarray(to_uint8(tile)).resize((side, side), Image.Resampling.NEAREST)
    image.paste(resized, (x, header))
    draw.text((x + 2, 3), caption, fill=(0, 0, 0))
  return np.asarray(image)


def show(image_hw3: np.ndarray, path: str | None = None) -> None:
  """Displays a uint8 picture in the notebook (PNG), saving it to `path` first if given."""
  from IPython.display import Image as IPythonImage
  from IPython.display import display

  buf = io.BytesIO()
  Image.fromarray(to_uint8(image_hw3)).save(buf, format='PNG')
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(buf.getvalue())
  display(IPythonImage(data=buf.getvalue(), format='png'))


def write_scene(config: mlc.ConfigDict, index: int, path: str) -> dict[str, np.ndarray]:
  """Writes synthetic scene `index` of `config`'s generator to `path` as a PNG.

  Returns its 'image' (S, S, 3) normalised input and 'depth' (R, R) true depth (scene units).
  Pass an index >= `config.data.num_synthetic` for a scene the run never trained on.
  """
  from triplane3d.evaluate import reconstruction

  scene = reconstruction.scene_example(config, index)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(input_uint8(scene['image'][0])).save(path)
  return {'image': scene['image'][0], 'depth': scene['depth'][0, ..., 0]}


def show_reconstruction(
  image_path: str, out_dir: str, near: float, far: float, true_depth_rr: np.ndarray | None = None
) -> str:
  """Shows what `reconstruct.reconstruct_files` wrote to `out_dir` for one input: input | RGB |
  depth (| true depth), then the orbit GIF if one was written. Saves the row as
  OUT/NAME.panel.png and returns that path.

  Args:
    image_path: the input image file; NAME is `reconstruct.output_name` of it.
    near, far: the camera's depth range, the ends of the depth colour map.
    true_depth_rr: the true depth (R, R) when known (synthetic scenes).
  """
  from IPython.display import Image as IPythonImage
  from IPython.display import display

  from triplane3d import reconstruct
  from triplane3d.data import images

  base = os.path.join(out_dir, reconstruct.output_name(image_path))
  with Image.open(f'{base}.rgb.png') as im:
    rgb = np.asarray(im.convert('RGB'))
  depth = np.load(f'{base}.depth.npy')
  tiles = [
    ('input', np.asarray(images.open_rgb(image_path))),
    ('RGB', rgb),
    (f'depth {depth.min():.2f}..{depth.max():.2f}', summaries.colorize_depth(depth, near, far)),
  ]
  if true_depth_rr is not None:
    tiles.append(('true depth', summaries.colorize_depth(true_depth_rr, near, far)))
  path = f'{base}.panel.png'
  show(panel(tiles), path)
  if os.path.isfile(f'{base}.views.gif'):
    display(IPythonImage(filename=f'{base}.views.gif'))
  return path


def feature_change(a_nd: np.ndarray, b_nd: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """Per-patch cosine distance 1 − cos(a, b) of two backbones' features of the same image.

  Args:
    a_nd, b_nd: (N, D) features of N = h·w patches (same D).
    grid_hw: (h, w).

  Returns:
    float32 (h, w) in [0, 2]: 0 where a patch's feature direction did not change.
  """
  a, b = np.asarray(a_nd, np.float64), np.asarray(b_nd, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'feature_change: features differ in shape, {a.shape} vs {b.shape}.')
  norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
  return (1.0 - (a * b).sum(axis=1) / norms).reshape(grid_hw).astype(np.float32)


def pca_row(
  image_ss3: np.ndarray, backbones: Mapping[str, tuple[Any, Any]], with_change: bool = False
) -> np.ndarray:
  """input | one PCA image per backbone (`pca_rgb` of its last-block patch features).

  Args:
    image_ss3: (S, S, 3) ImageNet-normalised input.
    backbones: caption → (model, params), as `convert.load_backbone` returns them.
    with_change: with two backbones of the same width, also a grey tile of `feature_change`
      between them, white at its largest value (printed in the caption): fine-tuning can move
      the features too little for the PCA pictures to show.

  Returns:
    The `panel` (uint8).
  """
  tiles = [('input', input_uint8(image_ss3))]
  feats = []
  for caption, (model, params) in backbones.items():
    f, grid = patch_features(model, params, image_ss3)
    feats.append(f)
    tiles.append((f'{caption} ({grid[0]}x{grid[1]})', pca_rgb(f, grid)))
  if with_change and len(feats) == 2 and feats[0].shape == feats[1].shape:
    change = feature_change(feats[0], feats[1], grid)
    top = float(change.max())
    tiles.append((f'1-cos, white={top:.3f}', change / max(top, 1e-12)))
  return panel(tiles)
