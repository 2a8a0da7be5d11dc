"""Synthetic scenes with exact depth: a dataset that runs the whole method without ImageNet.

Each scene is one labelled primitive (sphere, box, cylinder, cone, torus) with a procedural
texture (flat, checker, stripes, noise, dots), a size (small, medium, large) and a random pose,
plus up to two small unlabelled distractors, Lambert-shaded by a random light, in front of a
textured background dome. Images are ray cast from the project's one camera
(`triplane3d.render.camera.Camera`), so depth is the exact distance along each unit ray — the
renderer's convention. The background is a sphere of radius `camera.far` around the camera:
its depth is exactly `far` on every ray (the renderer clamps depth to [near, far] anyway).
Objects sit inside the triplane box (centres within 0.15 of (0, 0, 2), bounding radius
≤ 0.34), so their visible depth lies in [near, far].

Everything is deterministic: scene `i` draws from `np.random.default_rng([seed, i])`, so the
bytes do not depend on the order or sharding of generation. Variants for robustness tests:

  texture_mode='class'     class k (shape k) always has texture k: texture predicts shape.
  texture_mode='mixed'     class k has texture k with probability `texture_class_prob`, else a
                           texture drawn independently of the class (one draw per base scene).
  texture_mode='random'    texture independent of shape.
  texture_mode='conflict'  cue conflict: shape of class k with the texture of another class;
                           `label` is the shape class, `texture_label` the texture's class.
  variation='texture'|'size'  single-factor sets: consecutive examples re-render one base
                           scene (`base_id`) with only the texture (or size) changed.

Written as an image dataset (`NAME`: image PNG, label, texture_label, size_label,
background_label, base_id, file_name) plus a depth dataset (`DEPTH_NAME`) in exactly the
format `precompute_depth` writes (`depth_format`), so the demo runs the production data path.

  python -m triplane3d.data.synthetic --data_dir=/tmp/data --num_examples=2000
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image

from triplane3d.data import depth_format, records, scenes
from triplane3d.render.camera import Camera, ray_table

NAME = 'synthetic_scenes'
DEPTH_NAME = 'synthetic_scenes_depth'
SHAPES = scenes.SHAPES
TEXTURES = ('flat', 'checker', 'stripes', 'noise', 'dots')  # Class k's own texture: TEXTURES[k].
SIZES = {'small': 0.2, 'medium': 0.27, 'large': 0.34}
BACKGROUNDS = ('flat', 'gradient', 'checker', 'noise')
EXAMPLES_PER_SHARD = 1024


def default_resolution(render_resolution: int, img_size: int) -> int:
  """Side of generated images: at least both training sides (and 64), so crops downsample."""
  return max(64, int(render_resolution), int(img_size))


def _rotation(rng) -> np.ndarray:
  q = rng.normal(size=4)
  w, x, y, z = q / np.linalg.norm(q)
  return np.asarray(
    [
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
  )


def _texture_params(rng) -> dict:
  return {
    'colors': rng.uniform(0.05, 0.95, size=(2, 3)),
    'freq': rng.uniform(3.0, 6.0),
    'dirs': rng.normal(size=(3, 3)),
    'phase': rng.uniform(0, 2 * np.pi, size=3),
  }


def _texture(kind: str, p_n3: np.ndarray, tp: dict) -> np.ndarray:
  """Colour (N, 3) in [0, 1] of a procedural texture at points p (in object units)."""
  c0, c1 = tp['colors']
  q = p_n3 * tp['freq']
  if kind == 'flat':
    m = np.zeros(len(p_n3))
  elif kind == 'checker':
    m = np.floor(q).sum(-1) % 2
  elif kind == 'stripes':
    m = np.floor(q @ tp['dirs'][0] / np.linalg.norm(tp['dirs'][0])) % 2
  elif kind == 'noise':
    m = sum(np.sin(q @ tp['dirs'][i] + tp['phase'][i]) for i in range(3))
    m = np.clip(0.5 + m / 3.0, 0, 1)
  elif kind == 'dots':
    m = (np.linalg.norm(q - np.round(q), axis=-1) < 0.3).astype(np.float64)
  else:
    raise ValueError(f'unknown texture {kind!r}; known: {TEXTURES}.')
  return c0 + m[:, None] * (c1 - c0)


def _background(kind: str, d_n3: np.ndarray, tp: dict) -> np.ndarray:
  """Colour (N, 3) of the background dome seen along unit directions d."""
  uv = d_n3[:, :2] / d_n3[:, 2:3]  # Image-plane coordinates: the dome looks like a backdrop.
  if kind == 'gradient':
    c0, c1 = tp['colors']
    m = np.clip(0.5 + uv[:, 1], 0, 1)
    return c0 + m[:, None] * (c1 - c0)
  if kind == 'flat':
    return _texture('flat', d_n3, tp)
  return _texture(kind, np.concatenate([uv, np.zeros_like(uv[:, :1])], -1) * 2.0, tp)


def sample_scene(
  index: int, seed: int, *, texture_mode='class', variation=None, texture_class_prob=1.0
) -> dict:
  """The parameters and labels of scene `index` (a plain dict; see module docstring)."""
  base = index if variation is None else index // (len(TEXTURES) if variation == 'texture' else 3)
  if texture_mode == 'mixed':  # Its own stream: the scene's other draws do not depend on it.
    tied = np.random.default_rng([seed, base, 1]).random() < texture_class_prob
    texture_mode = 'class' if tied else 'random'
  rng = np.random.default_rng([seed, base])
  shape = int(rng.integers(len(SHAPES)))
  size = int(rng.integers(len(SIZES)))
  offset = int(rng.integers(1, len(TEXTURES)))  # For cue conflict: another class's texture.
  texture = int(rng.integers(len(TEXTURES)))
  if texture_mode == 'class':
    texture = shape
  elif texture_mode == 'conflict':
    texture = (shape + offset) % len(TEXTURES)
  elif texture_mode != 'random':
    raise ValueError(
      f"texture_mode must be 'class', 'mixed', 'random' or 'conflict', got {texture_mode!r}."
    )
  if variation == 'texture':
    texture = index % len(TEXTURES)
  elif variation == 'size':
    size = index % len(SIZES)
  elif variation is not None:
    raise ValueError(f"variation must be None, 'texture' or 'size', got {variation!r}.")
  objects = [
    {
      'shape': SHAPES[shape],
      'texture': TEXTURES[texture],
      'size': list(SIZES.values())[size],
      'center': np.asarray([0.0, 0.0, 2.0]) + rng.uniform(-0.15, 0.15, 3),
      'rotation': _rotation(rng),
      'aspect': rng.uniform(0.7, 1.3, 3),
      'tex': _texture_params(rng),
    }
  ]
  for _ in range(int(rng.integers(0, 3))):
    objects.append(
      {
        'shape': SHAPES[int(rng.integers(len(SHAPES)))],
        'texture': TEXTURES[int(rng.integers(len(TEXTURES)))],
        'size': rng.uniform(0.07, 0.11),
        'center': np.asarray([0.0, 0.0, 2.0]) + rng.uniform([-0.4, -0.4, -0.3], [0.4, 0.4, 0.3]),
        'rotation': _rotation(rng),
        'aspect': rng.uniform(0.7, 1.3, 3),
        'tex': _texture_params(rng),
      }
    )
  background = int(rng.integers(len(BACKGROUNDS)))
  light = rng.normal(size=3) * [1, 1, 0.3] - [0, 0, 1.0]  # Mostly from the camera's side.
  return {
    'objects': objects,
    'background': BACKGROUNDS[background],
    'bg_tex': _texture_params(rng),
    'light': light / np.linalg.norm(light),
    'ambient': rng.uniform(0.25, 0.45),
    'labels': {
      'label': shape,
      'texture_label': texture,
      'size_label': size,
      'background_label': background,
      'base_id': base,
    },
  }


def render(scene: dict, camera: Camera, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Ray casts a scene from `camera`.

  Returns:
    (rgb_hw3 uint8, depth_hw float64): depth is the distance along each unit ray to the first
    surface, exactly `camera.far` on the background.
  """
  rgb, depth, _ = render_with_ids(scene, camera, resolution)
  return rgb, depth


def render_with_ids(scene: dict, camera: Camera, resolution: int):
  """`render`, plus which object each pixel sees.

  Returns:
    (rgb_hw3 uint8, depth_hw float64, ids_hw int32): ids are -1 on the background, else the
    index into `scene['objects']` (0 is the labelled object, 1-2 the distractors).
  """
  o, d = ray_table(camera, resolution)  # The camera is fixed: one table per resolution.
  depth = np.full(len(o), np.inf)
  ids = np.full(len(o), -1, np.int32)
  rgb = _background(scene['background'], d @ camera.rotation_matrix, scene['bg_tex'])
  for k, obj in enumerate(scene['objects']):
    # Only rays through the object's bounding sphere are cast (most miss small objects).
    radius = 1.01 * obj['size'] * max(1.0, float(np.max(obj['aspect'])))
    oc = o - obj['center']
    b = np.sum(oc * d, -1)
    ray = np.flatnonzero(b * b - np.sum(oc * oc, -1) + radius**2 >= 0)
    if not len(ray):
      continue
    rot = obj['rotation']
    o_l, d_l = oc[ray] @ rot, d[ray] @ rot  # Rᵀx for row vectors: world → local.
    t, n_l = scenes.intersect(obj['shape'], o_l, d_l, obj['size'], obj['aspect'])
    closer = t < depth[ray]
    if not closer.any():
      continue
    p_l = o_l[closer] + t[closer, None] * d_l[closer]
    n_w = n_l[closer] @ rot.T
    diffuse = np.clip(n_w @ scene['light'], 0, 1)  # `light` points towards the light.
    shade = scene['ambient'] + (1 - scene['ambient']) * diffuse
    color = _texture(obj['texture'], p_l / obj['size'], obj['tex']) * shade[:, None]
    rgb[ray[closer]], depth[ray[closer]], ids[ray[closer]] = color, t[closer], k
  depth = np.where(np.isfinite(depth), depth, camera.far)
  rgb = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
  hw = (resolution, resolution)
  return rgb.reshape(*hw, 3), depth.reshape(hw), ids.reshape(hw)


def image_features() -> tfds.features.FeaturesDict:
  label = lambda names: tfds.features.ClassLabel(names=list(names))  # noqa: E731
  return tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
      'label': label(SHAPES),
      'texture_label': label(TEXTURES),
      'size_label': label(SIZES),
      'background_label': label(BACKGROUNDS),
      'base_id': tfds.features.Scalar(dtype=np.int64),
      'file_name': tfds.features.Text(),
    }
  )


def degrade_depth(
  depth_hw, camera: Camera, blur: float, noise: float, rng, noise_cells: int = 0
) -> np.ndarray:
  """Depth as a cheap estimator might give it: Gaussian blur of `blur` pixels (edges smeared
  into the background), then Gaussian noise of std `noise` (scene units), clipped to
  [near, far]. `noise_cells` > 0 draws the noise on a noise_cells × noise_cells grid and
  spreads each value over its block of pixels (nearest neighbour), so that resizing to that
  side (the renderer's targets) keeps it rather than averaging it away. blur = noise = 0
  returns the depth unchanged.
  """
  if blur < 0 or noise < 0:
    raise ValueError(f'depth blur and noise must be >= 0, got {blur}, {noise}.')
  out = np.asarray(depth_hw, np.float64)
  if blur > 0:
    from scipy import ndimage

    out = ndimage.gaussian_filter(out, blur, mode='nearest')
  if noise > 0:
    h, w = out.shape
    if noise_cells > 0:
      grid = rng.normal(0.0, noise, (noise_cells, noise_cells))
      rows = np.minimum(np.arange(h) * noise_cells // h, noise_cells - 1)
      cols = np.minimum(np.arange(w) * noise_cells // w, noise_cells - 1)
      out = out + grid[rows][:, cols]
    else:
      out = out + rng.normal(0.0, noise, out.shape)
  return np.clip(out, camera.near, camera.far) if blur > 0 or noise > 0 else out


def example(
  index: int,
  seed: int,
  camera: Camera,
  resolution: int,
  *,
  depth_blur: float = 0.0,
  depth_noise: float = 0.0,
  noise_cells: int = 0,
  **kw,
) -> tuple[dict, dict]:
  """(image record, depth record) of scene `index`; `depth_blur` / `depth_noise` > 0 store a
  degraded depth (`degrade_depth`) instead of the exact one. `kw`: `sample_scene`'s options."""
  scene = sample_scene(index, seed, **kw)
  rgb, depth = render(scene, camera, resolution)
  rng = np.random.default_rng([seed, index, 2])
  depth = degrade_depth(depth, camera, depth_blur, depth_noise, rng, noise_cells)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format='PNG')
  key = f'scene_{index:07d}'
  image = {'image': buf.getvalue(), 'file_name': key, **scene['labels']}
  return image, depth_format.encode(depth, key)


def write(data_dir, num_examples, seed, camera, resolution, *, name=NAME, depth_name=None, **kw):
  """Generates `num_examples` scenes into datasets `name` and `depth_name` (split 'train')."""
  depth_name = depth_name or name + '_depth'
  num_shards = max(1, -(-num_examples // EXAMPLES_PER_SHARD))
  img_f, depth_f = image_features(), depth_format.features()
  for s in range(num_shards):
    pairs = [
      example(i, seed, camera, resolution, **kw)
      for i in range(s * num_examples // num_shards, (s + 1) * num_examples // num_shards)
    ]
    records.write_shard(data_dir, name, 'train', img_f, [p[0] for p in pairs], s, num_shards)
    records.write_shard(
      data_dir, depth_name, 'train', depth_f, [p[1] for p in pairs], s, num_shards
    )
  degraded = kw.get('depth_blur') or kw.get('depth_noise')
  desc = f'Synthetic scenes with {"degraded" if degraded else "exact"} depth (triplane3d.data.synthetic).'
  records.finalize(data_dir, name, img_f, desc)
  records.finalize(data_dir, depth_name, depth_f, desc)


def ensure_dataset(
  data_dir: str,
  num_examples: int,
  seed: int,
  camera: Camera,
  resolution: int,
  *,
  name: str = NAME,
  texture_mode: str = 'class',
  variation: str | None = None,
  texture_class_prob: float = 1.0,
  depth_blur: float = 0.0,
  depth_noise: float = 0.0,
  noise_cells: int = 0,
) -> None:
  """Generates the dataset unless it already exists with the same parameters (idempotent).

  `texture_class_prob` applies to texture_mode='mixed'; `depth_blur` / `depth_noise` > 0 store
  a degraded depth (`degrade_depth`, with `noise_cells`).

  Written into a private temporary directory and moved into place, so concurrent callers (every
  host of a job) and interrupted runs never expose a partial dataset. An existing dataset made
  with other parameters is an error, never overwritten.
  """
  depth_name = name + '_depth'
  params = {
    'num_examples': int(num_examples),
    'seed': int(seed),
    'resolution': int(resolution),
    'camera': {k: list(v) if isinstance(v, tuple) else v for k, v in vars(camera).items()},
    'texture_mode': texture_mode,
    'variation': variation,
  }
  kw = {'texture_mode': texture_mode, 'variation': variation}
  # Recorded only when used, so datasets generated before these options still match.
  extra = {'texture_class_prob': float(texture_class_prob)} if texture_mode == 'mixed' else {}
  extra.update(
    {k: float(v) for k, v in (('depth_blur', depth_blur), ('depth_noise', depth_noise)) if v}
  )
  if depth_noise and noise_cells:
    extra['noise_cells'] = int(noise_cells)
  params.update(extra)
  kw.update(extra)
  params_path = os.path.join(records.dataset_dir(data_dir, name), 'generation.json')
  if records.is_prepared(data_dir, name) and records.is_prepared(data_dir, depth_name):
    with open(params_path) as f:
      existing = json.load(f)
    if existing != params:
      raise ValueError(
        f'{data_dir}/{name} was generated with {existing}, not {params}; use another data_dir.'
      )
    return
  tmp = os.path.join(data_dir, f'.tmp-{name}-{os.getpid()}-{time.time_ns()}')
  try:
    write(tmp, num_examples, seed, camera, resolution, name=name, depth_name=depth_name, **kw)
    with open(os.path.join(records.dataset_dir(tmp, name), 'generation.json'), 'w') as f:
      json.dump(params, f, indent=1)
    for n in (depth_name, name):  # The image dataset last: its metadata marks completion.
      if not os.path.exists(os.path.join(data_dir, n)):
        try:
          os.rename(os.path.join(tmp, n), os.path.join(data_dir, n))
        except OSError:
          pass  # Another process moved an identical copy into place first.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _define_flags():
  # Only when run as a program: importing this module must not register global absl flags.
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to write into.', required=True)
  flags.DEFINE_integer('num_examples', 2000, 'Number of scenes.')
  flags.DEFINE_integer('seed', 0, 'Generation seed.')
  flags.DEFINE_integer('resolution', 64, 'Image side in pixels.')
  flags.DEFINE_string('name', NAME, 'Dataset name; depth goes to NAME_depth.')
  flags.DEFINE_enum('texture_mode', 'class', ['class', 'mixed', 'random', 'conflict'], 'Textures.')
  flags.DEFINE_float('texture_class_prob', 1.0, "texture_mode='mixed': P(the class's texture).")
  flags.DEFINE_float('depth_blur', 0.0, 'Degraded depth: Gaussian blur σ in pixels.')
  flags.DEFINE_float('depth_noise', 0.0, 'Degraded depth: noise std in scene units.')
  flags.DEFINE_enum('variation', None, ['texture', 'size'], 'Single-factor variation set.')


def main(argv):
  del argv
  f = flags.FLAGS
  start = time.time()
  ensure_dataset(
    f.data_dir,
    f.num_examples,
    f.seed,
    Camera(),
    f.resolution,
    name=f.name,
    texture_mode=f.texture_mode,
    variation=f.variation,
    texture_class_prob=f.texture_class_prob,
    depth_blur=f.depth_blur,
    depth_noise=f.depth_noise,
  )
  print(f'{f.name}: {f.num_examples} scenes in {f.data_dir} ({time.time() - start:.1f} s)')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
