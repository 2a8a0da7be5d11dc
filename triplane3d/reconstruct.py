"""Reconstruct images with a trained run: rendered RGB, depth, and a short orbit around it.

  python -m triplane3d.reconstruct --workdir=DIR --images='photos/*.jpg' --out=OUT [--step=N]
      [--config=configs/X.py --config.a.b=v ...]

For every image (a file, a directory of images, or a glob; quote globs so the shell does not
expand them), writes to OUT, with NAME the image file's stem:

  NAME.rgb.png     the render from the training camera, R × R (R = config.render.resolution)
  NAME.depth.npy   float32 (R, R): the rendered depth along each unit-length ray, scene units
  NAME.depth.png   that depth in colour, camera near (dark) → far (bright)
  NAME.views.gif   the same triplanes seen from a camera swinging ±max_angle degrees about the
                   vertical axis through the triplane box centre (RGB | depth per frame)

The whole image is the input (no crop): converted to RGB and resized to the backbone's square
input with PIL's bilinear filter, so a non-square image is squeezed as needed.

Without --config, the config stored in the workdir by training (config.json) is used, with any
--config.x=y overrides applied to it (e.g. --config.render.chunk=1024); runs older than that
store none: pass the --config file and every override they were trained with (default: the
demo config). Parameters that do not fit the config are refused with the differing paths
listed. Images that cannot be read are skipped and listed at the end, and the exit status is
then 1.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image, ImageDraw

from triplane3d import summaries
from triplane3d.data import images
from triplane3d.data.transforms import imagenet_normalize
from triplane3d.models.prior3d import Prior3D
from triplane3d.models.triplane import point_mlp
from triplane3d.render import Camera, RenderOptions, render_image
from triplane3d.render.camera import ray_table

# The renderer's key for every view: the trainer's image grids use the same one.
RENDER_SEED = 0
_FRAME_MS = 100  # GIF frame duration.


def find_images(pattern: str) -> list[str]:
  """The image files named by `pattern`: one file, a directory's image files, or a glob.

  A directory contributes the files whose extension PIL knows as an image format; a glob keeps
  every file it matches (unreadable ones are reported later). Sorted; raises
  FileNotFoundError when nothing matches.
  """
  path = os.path.expanduser(pattern)
  if os.path.isdir(path):
    known = set(Image.registered_extensions())
    names = sorted(os.listdir(path))
    files = [os.path.join(path, n) for n in names if os.path.splitext(n)[1].lower() in known]
  elif os.path.isfile(path):
    files = [path]
  else:
    files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  if not files:
    raise FileNotFoundError(f'no image files match --images={pattern!r}.')
  return files


def output_name(path: str) -> str:
  """NAME of an input's outputs: its file name without the last extension."""
  return os.path.splitext(os.path.basename(path))[0]


def check_unique_names(paths: list[str]) -> None:
  """Raises ValueError when two inputs share a NAME (their outputs would overwrite)."""
  by_name: dict[str, list[str]] = {}
  for p in paths:
    by_name.setdefault(output_name(p), []).append(p)
  clashes = {k: v for k, v in by_name.items() if len(v) > 1}
  if clashes:
    listed = '; '.join(f'{k}: {", ".join(v)}' for k, v in sorted(clashes.items()))
    raise ValueError(
      f'inputs share output names, so their outputs would overwrite each other ({listed}); '
      'reconstruct them into different --out directories.'
    )


def load_image(path: str, size: int) -> np.ndarray:
  """An image file as the backbone input: float32 (size, size, 3), ImageNet-normalised.

  The whole image, decoded as in training (`images.open_rgb`: upright, 16-bit scaled, alpha
  over white) and resized to a square with PIL's bilinear filter, like the training pipeline's
  resize but without a crop.
  """
  img = images.open_rgb(path)
  pixels = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), np.float32)
  return imagenet_normalize(pixels)


def orbit_angles(num_frames: int, max_angle: float) -> np.ndarray:
  """Yaw angles in degrees, (num_frames,): −max → +max → back, as a looping sweep.

  A cosine, so the camera slows down at both ends like a pendulum; the first frame is at
  −max_angle and, when num_frames is a multiple of 4, frame num_frames / 4 is at 0.
  """
  angles = -max_angle * np.cos(2.0 * np.pi * np.arange(num_frames) / num_frames)
  return np.round(angles, 9) + 0.0  # cos(π/2) is 6e-17, not 0: no '-0.0' captions.


def orbit_camera(camera: Camera, yaw: float) -> Camera:
  """`camera` turned by `yaw` degrees about the vertical (world y) axis through the box centre.

  The whole pose turns rigidly, so the camera keeps its distance to the box centre and the
  centre stays at the same pixel: the middle of the image for a camera that looks at it, as
  the default one does. Positive yaw moves the default camera towards −x (to its left).
  Intrinsics, near / far and the box are unchanged.
  """
  c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
  turn = np.asarray([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
  center = np.asarray(camera.box_center, np.float64)
  position = center + turn @ (np.asarray(camera.position, np.float64) - center)
  rotation = turn @ camera.rotation_matrix
  return dataclasses.replace(
    camera,
    position=tuple(float(x) for x in position),
    rotation=tuple(float(x) for x in rotation.ravel()),
  )


def image_key(key: jax.Array) -> jax.Array:
  """The key `render_batch` hands its first image when called with `key`."""
  return jax.random.split(key, 1)[0]


def render_view(
  planes: jax.Array,
  mlp_params: Any,
  origins_n3: jax.Array,
  dirs_n3: jax.Array,
  key: jax.Array,
  *,
  options: RenderOptions,
  decode_fn: Any = point_mlp,
) -> tuple[jax.Array, jax.Array]:
  """Renders one image's triplanes along explicit rays (any camera pose, one compilation).

  `render_image` with `rays=`: the pose is an input rather than part of the static options, so
  every orbit frame shares one compiled function. The configured camera's own rays reproduce
  the model's render (same key, same per-pixel draws).

  Args:
    planes: (3, H, W, C) triplanes of one image; mlp_params: the point decoder's params.
    origins_n3, dirs_n3: (R², 3) ray origins and unit directions, row-major pixel order.
    key: as `render_image`'s key.
    options: rendering settings (sample range and box from `options.camera`).
    decode_fn: the point decoder (`Prior3D.decode_fn`: `point_mlp` in render.mlp_dtype).

  Returns:
    `(rgb (R², 3), depth (R², 1))`.
  """
  out = render_image(
    planes, mlp_params, key, decode_fn=decode_fn, options=options, rays=(origins_n3, dirs_n3)
  )
  return out.rgb, out.depth


class Reconstructor:
  """A model with restored params: one image → render, depth and orbit frames (numpy).

  Compiles two functions, whatever the number of images and frames: the forward pass (as
  the trainer's image grids: `Prior3D.reconstruct(..., full=True)` with key RENDER_SEED) and
  `render_view` for the orbit frames.
  """

  def __init__(
    self, config: mlc.ConfigDict, params: dict, *, num_frames: int = 20, max_angle: float = 30.0
  ):
    self.model = Prior3D.from_config(config)
    self.params = params
    self.camera = self.model.options.camera
    self.resolution = self.model.options.resolution
    self.img_size = self.model.img_size
    # No views for the 'conv' ablation: it predicts images directly, with nothing 3D to turn.
    self.has_views = self.model.mlp is not None
    self.angles = orbit_angles(num_frames, max_angle)
    self._key = jax.random.key(RENDER_SEED)
    self._forward = jax.jit(self._forward_fn)
    options = dataclasses.replace(self.model.options, rays_per_image=0)
    decode = self.model.decode_fn if self.has_views else point_mlp
    self._render = jax.jit(functools.partial(render_view, options=options, decode_fn=decode))
    # The orbit's rays are the same for every image.
    self._rays = []
    for yaw in self.angles:
      origins, dirs = ray_table(orbit_camera(self.camera, yaw), self.resolution)
      # float32 as `render_image` casts its table (to the planes' dtype).
      self._rays.append((origins.astype(np.float32), dirs.astype(np.float32)))

  def _forward_fn(self, params, images_bss3):
    model = self.model
    h = model.representation(params['backbone'], images_bss3)
    out = model.reconstruct(params, h, self._key, full=True)
    return out['rgb'], out['depth'], out.get('planes')

  def __call__(self, image_ss3: np.ndarray) -> dict[str, Any]:
    """Reconstructs one normalised input image (S, S, 3).

    Returns:
      {'rgb': float32 (R, R, 3), 'depth': float32 (R, R) scene units, 'frames': a list of
       (yaw, rgb (R, R, 3), depth (R, R)) per orbit frame (empty for the 'conv' decoder)}.
    """
    r = self.resolution
    rgb, depth, planes = self._forward(self.params, jnp.asarray(image_ss3)[None])
    frames = []
    if self.has_views:
      key = image_key(self._key)
      for yaw, (origins, dirs) in zip(self.angles, self._rays):
        f_rgb, f_depth = self._render(planes[0], self.params['mlp'], origins, dirs, key)
        frames.append(
          (float(yaw), np.asarray(f_rgb).reshape(r, r, 3), np.asarray(f_depth).reshape(r, r))
        )
    return {
      'rgb': np.asarray(rgb, np.float32).reshape(r, r, 3),
      'depth': np.asarray(depth, np.float32).reshape(r, r),
      'frames': frames,
    }


def views_frame(yaw: float, rgb_rr3: np.ndarray, depth_rr: np.ndarray, near: float, far: float):
  """One GIF frame, a PIL RGB image: a caption with the yaw above RGB | depth, enlarged."""
  rgb = summaries.upscale(summaries.to_uint8(rgb_rr3))
  depth = summaries.upscale(summaries.colorize_depth(depth_rr, near, far))
  caption = f'yaw {yaw:+.1f} deg'
  gap = 4
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  left, top, _, bottom = probe.textbbox((0, 0), caption)
  header = bottom - top + 2 * gap
  canvas = np.full((header + rgb.shape[0], 2 * rgb.shape[1] + gap, 3), 255, np.uint8)
  canvas[header:, : rgb.shape[1]] = rgb
  canvas[header:, rgb.shape[1] + gap :] = depth
  image = Image.fromarray(canvas)
  # The caption also keeps consecutive frames distinct: PIL merges identical GIF frames.
  ImageDraw.Draw(image).text((gap - left, gap - top), caption, fill=(0, 0, 0))
  return image


def write_outputs(name: str, out_dir: str, result: dict, camera: Camera) -> list[str]:
  """Writes NAME.rgb.png, NAME.depth.npy, NAME.depth.png (and NAME.views.gif); their paths."""
  base = os.path.join(out_dir, name)
  paths = [f'{base}.rgb.png', f'{base}.depth.npy', f'{base}.depth.png']
  Image.fromarray(summaries.to_uint8(result['rgb'])).save(paths[0])
  np.save(paths[1], result['depth'].astype(np.float32))
  Image.fromarray(summaries.colorize_depth(result['depth'], camera.near, camera.far)).save(paths[2])
  if result['frames']:
    paths.append(f'{base}.views.gif')
    frames = [views_frame(*f, camera.near, camera.far) for f in result['frames']]
    frames[0].save(paths[3], save_all=True, append_images=frames[1:], duration=_FRAME_MS, loop=0)
  return paths


def reconstruct_files(
  recon: Reconstructor, paths: list[str], out_dir: str
) -> tuple[int, list[tuple[str, str]]]:
  """Reconstructs every image of `paths` into `out_dir`, printing one line per image.

  Returns:
    (number of images written, [(path, reason)] of those skipped as unreadable).
  """
  os.makedirs(out_dir, exist_ok=True)
  done, skipped = 0, []
  for path in paths:
    try:
      image = load_image(path, recon.img_size)
    except Exception as err:  # Any decoder failure means the file is not a readable image.
      skipped.append((path, f'{type(err).__name__}: {err}'))
      print(f'{path}: skipped, unreadable ({type(err).__name__}: {err})', flush=True)
      continue
    result = recon(image)
    written = write_outputs(output_name(path), out_dir, result, recon.camera)
    d = result['depth']
    names = ', '.join(os.path.basename(p) for p in written)
    print(f'{path} → {names} (depth {d.min():.3f}..{d.max():.3f})', flush=True)
    done += 1
  return done, skipped


def main(argv) -> int:
  """The CLI (flags from `_define_flags`); returns the exit status."""
  from triplane3d import checkpoint, run_config

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    # The printed lines are this tool's report; orbax's INFO chatter would bury them.
    logging.set_verbosity(logging.WARNING)
  if f.frames < 1:
    raise app.UsageError(f'--frames must be >= 1, got {f.frames}.')
  try:
    config = f.config
    stored = None if f['config'].present else run_config.read(f.workdir)
    if stored is not None:
      config = run_config.apply_overrides(stored, config_flags.get_override_values(f['config']))
    paths = find_images(f.images)
    check_unique_names(paths)
    step, params = checkpoint.restore_params(f.workdir, f.step, config)
  except (FileNotFoundError, ValueError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  source = 'its stored config' if stored is not None else f'config {f["config"].config_filename}'
  print(f'step {step} of {f.workdir} ({source}): {len(paths)} image(s) → {f.out}', flush=True)
  recon = Reconstructor(config, params, num_frames=f.frames, max_angle=f.max_angle)
  if not recon.has_views:
    print("decoder.kind='conv' has no triplanes: no views.gif is written.", flush=True)
  done, skipped = reconstruct_files(recon, paths, f.out)
  print(f'done: {done} reconstructed, {len(skipped)} skipped as unreadable.', flush=True)
  for path, reason in skipped:
    print(f'  skipped {path}: {reason}', file=sys.stderr)
  return 1 if skipped else 0


def _define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  from triplane3d import run_config

  demo = run_config.config_file('demo.py')
  run_config.define_config_flag(
    demo,
    'The config file the run was trained with, followed by the same --config.x=y overrides. '
    'Default: the config stored in --workdir (the demo config for runs that store none).',
  )
  flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string(
    'images', None, 'An image file, a directory of images, or a quoted glob.', required=True
  )
  flags.DEFINE_string('out', None, 'Output directory (created if needed).', required=True)
  flags.DEFINE_integer('frames', 20, 'Frames of the orbit GIF.')
  flags.DEFINE_float('max_angle', 30.0, 'Orbit half-angle in degrees.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
