"""Supervised pretraining of a small ViT on synthetic scenes: the demo's stand-in for DINOv2.

  python -m triplane3d.pretrain --out=configs/weights/vit_tiny14_synthetic.safetensors

3D-Prior fine-tunes a *pretrained* DINOv2. The demo cannot download one, and a randomly
initialised tiny ViT learns where the objects are too slowly for a demo's budget
(docs/reconstruction.md). This trains the backbone on synthetic scenes
(`triplane3d.data.synthetic`, generator seeds disjoint from the demo's training and held-out
scenes) to name the shape of the main object (a linear head on the class token and the mean
patch token; `shape_weight`), optionally its texture family (`texture_weight`: the testbed's
teacher names only that), and, per quarter of each patch, which shape or the background its
pixels see (a linear head on each patch token): 2D labels only, never depth. The heads are
thrown away.
It writes the backbone in DINOv2's official key format
(`convert.save_dinov2`), so `model.init_from` loads it like a released checkpoint (and, with
distillation, it is the frozen teacher), and beside it `<out>.json`: how it was made and its
accuracy on validation scenes of yet another seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from triplane3d import convert
from triplane3d.configs import common
from triplane3d.data import synthetic, transforms
from triplane3d.models import vit
from triplane3d.render.camera import Camera


@dataclasses.dataclass(frozen=True)
class Options:
  variant: str = 'vit_tiny14'
  img_size: int = 112
  texture_mode: str = 'class'  # As the demo's scenes: each shape has its own texture.
  texture_class_prob: float = 1.0  # texture_mode='mixed': how often a shape has its own texture.
  num_scenes: int = 16384
  num_val: int = 1024
  # Far from the demo's scenes (config.seed: 0) and the evaluation suite's sets (seeds 1000-1008,
  # configs/eval/common.py): the stand-in must not have seen any scene it is judged on.
  scene_seed: int = 3001
  val_seed: int = 3002
  steps: int = 6000
  batch_size: int = 64
  lr: float = 1e-3
  warmup_steps: int = 300
  weight_decay: float = 0.05
  # Also name, for each of sub × sub cells per patch, which shape (or the background) its
  # pixels see: dense labels that teach the patch tokens where the objects are, as DINOv2's
  # patch features are known to (its objects segment with a linear probe). 0 turns it off.
  segment_weight: float = 1.0
  segment_sub: int = 2
  # What a cell is labelled with: 'shape' (background or which shape: 6 classes) or 'object'
  # (background or any object: where the objects are, not what they are).
  segment_labels: str = 'shape'
  # The probability that a training image's patches are shuffled (a random permutation of its
  # patch grid; its cell labels move with them): such an image keeps every local cue, texture
  # first, and loses the global shape. > 0 pushes the backbone towards texture (the testbed's).
  shuffle_prob: float = 0.0
  # Also name the main object's texture family (a linear head beside the shape head, this
  # weight): makes texture easy to read from the features, as it is from DINOv2's. 0: off.
  texture_weight: float = 0.0
  # The weight of the shape-naming loss. 0: the shape head gets no gradient and its accuracy is
  # not reported (the backbone learns texture and where the objects are only, and keeps only
  # the shape cues those give for free: the testbed's teacher).
  shape_weight: float = 1.0
  seed: int = 0
  log_every: int = 500


def scenes(
  seed: int,
  n: int,
  img_size: int,
  texture_mode: str,
  cells: int = 0,
  texture_class_prob: float = 1.0,
  segment_labels: str = 'shape',
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Scenes 0..n-1 of generator seed `seed` (`synthetic.sample_scene`'s texture options).

  Returns:
    images uint8 (n, S, S, 3); shape labels int32 (n,); and, where `cells` > 0, per-cell
    class fractions float16 (n, cells, cells, 1 + len(SHAPES)): which share of each of a
    cells × cells grid's pixels sees the background (class 0) or an object of shape k (class
    k + 1; distractors count by their shape), or with segment_labels='object' of 2 classes
    (background, any object); and the main object's texture labels int32 (n,). `cells` must
    divide S.
  """
  camera = Camera.from_config(common.get_base_config().camera)
  images = np.empty((n, img_size, img_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  texture_labels = np.empty((n,), np.int32)
  num_classes = 1 + (len(synthetic.SHAPES) if segment_labels == 'shape' else 1)
  fractions = np.zeros((n, cells, cells, num_classes), np.float16)
  if cells and img_size % cells:
    raise ValueError(f'cells={cells} must divide img_size={img_size}.')
  for i in range(n):
    scene = synthetic.sample_scene(
      i, seed, texture_mode=texture_mode, texture_class_prob=texture_class_prob
    )
    images[i], _, ids = synthetic.render_with_ids(scene, camera, img_size)
    labels[i] = scene['labels']['label']
    texture_labels[i] = scene['labels']['texture_label']
    if cells:
      shape_of = np.asarray([synthetic.SHAPES.index(o['shape']) + 1 for o in scene['objects']])
      if segment_labels == 'object':
        shape_of = np.ones_like(shape_of)
      cls = np.where(ids >= 0, shape_of[np.maximum(ids, 0)], 0)
      onehot = np.eye(num_classes, dtype=np.float32)[cls]
      p = img_size // cells
      fractions[i] = onehot.reshape(cells, p, cells, p, num_classes).mean((1, 3))
  return images, labels, fractions, texture_labels


class Classifier(nn.Module):
  """The backbone (parameters under 'backbone'), a linear shape head on [class, mean patch],
  and a linear segmentation head on each patch token.

  Returns (shape logits (B, num_classes), cell logits (B, G·sub, G·sub, 1 + num_classes)) for
  G × G patches, each split into sub × sub cells.
  """

  variant: str
  num_classes: int
  sub: int = 2
  segment_classes: int = 0  # 0: 1 + num_classes (background or which shape).
  num_textures: int = 0  # > 0: a texture head too (its logits are returned third, else None).

  @nn.compact
  def __call__(self, x_bhwc):
    f = vit.create(self.variant, name='backbone')(x_bhwc)
    patches = f['x_norm_patchtokens']  # (B, G·G, D)
    z = jnp.concatenate([f['x_norm_clstoken'], patches.mean(1)], -1)
    logits = nn.Dense(self.num_classes, name='head')(z)
    b, n, _ = patches.shape
    g, k, c = math.isqrt(n), self.sub, self.segment_classes or self.num_classes + 1
    cells = nn.Dense(k * k * c, name='segment_head')(patches).reshape(b, g, g, k, k, c)
    tex = nn.Dense(self.num_textures, name='texture_head')(z) if self.num_textures else None
    return logits, cells.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * k, g * k, c), tex


def shuffle_patches(x_bhwc, seg_bhwc, patch: int, which_b, rng):
  """Permutes the patch grid of the images `which_b` (bool (B,)), each with its own random
  permutation, and their cell labels with them (cells tile the patches: seg is (B, G·k, G·k,
  C) for G × G patches). Returns new (images, cells)."""
  x, seg = x_bhwc.copy(), seg_bhwc.copy()
  s = x.shape[1]
  g = s // patch
  k = seg.shape[1] // g

  def tiles(a, t):  # (H, W, C) → (G·G, t, t, C)
    return a.reshape(g, t, g, t, -1).transpose(0, 2, 1, 3, 4).reshape(g * g, t, t, -1)

  def untiles(a, t):
    return a.reshape(g, g, t, t, -1).transpose(0, 2, 1, 3, 4).reshape(g * t, g * t, -1)

  for i in np.flatnonzero(which_b):
    perm = rng.permutation(g * g)
    x[i] = untiles(tiles(x[i], patch)[perm], patch)
    seg[i] = untiles(tiles(seg[i], k)[perm], k)
  return x, seg


def check(o: Options) -> None:
  """Raises ValueError naming the option for settings that cannot work."""
  patch = vit.create(o.variant).patch_size  # Also rejects an unknown variant.
  problems = []
  if o.img_size % patch:
    problems.append(f'img_size={o.img_size} must be a multiple of the patch size {patch}')
  if min(o.steps, o.batch_size, o.num_scenes, o.num_val, o.log_every, o.segment_sub) < 1:
    problems.append('steps, batch_size, num_scenes, num_val, log_every, segment_sub must be ≥ 1')
  if not 0 <= o.warmup_steps < o.steps:
    problems.append(f'warmup_steps={o.warmup_steps} must be in [0, steps={o.steps})')
  if (patch // o.segment_sub) * o.segment_sub != patch:
    problems.append(f'segment_sub={o.segment_sub} must divide the patch size {patch}')
  if o.segment_labels not in ('shape', 'object'):
    problems.append(f"segment_labels={o.segment_labels!r} must be 'shape' or 'object'")
  if o.texture_mode not in ('class', 'mixed', 'random', 'conflict'):
    problems.append(
      f"texture_mode={o.texture_mode!r} must be 'class', 'mixed', 'random' or 'conflict'"
    )
  if min(o.texture_weight, o.segment_weight, o.shape_weight) < 0:
    problems.append('texture_weight, segment_weight and shape_weight must be ≥ 0')
  if o.shape_weight == o.texture_weight == o.segment_weight == 0:
    problems.append('shape_weight, texture_weight and segment_weight are all 0: nothing to learn')
  if not 0 <= o.shuffle_prob <= 1:
    problems.append(f'shuffle_prob={o.shuffle_prob} must be in [0, 1]')
  if not 0 <= o.texture_class_prob <= 1:
    problems.append(f'texture_class_prob={o.texture_class_prob} must be in [0, 1]')
  if o.scene_seed == o.val_seed:
    problems.append('scene_seed and val_seed must differ (validation on other scenes)')
  if problems:
    raise ValueError('pretrain options: ' + '; '.join(problems) + '.')


def render_sets(o: Options) -> dict[str, np.ndarray]:
  """The training and validation scenes of `o`: {'x', 'y', 'seg', 'tex'} and {'x_val',
  'y_val', 'seg_val', 'tex_val'} (`scenes`), rendered once; pass them to `train` to reuse them."""
  cells = o.img_size // vit.create(o.variant).patch_size * o.segment_sub
  kw = {'texture_class_prob': o.texture_class_prob, 'segment_labels': o.segment_labels}
  out = {}
  for suffix, seed, n in (('', o.scene_seed, o.num_scenes), ('_val', o.val_seed, o.num_val)):
    x, y, seg, tex = scenes(seed, n, o.img_size, o.texture_mode, cells, **kw)
    out.update({'x' + suffix: x, 'y' + suffix: y, 'seg' + suffix: seg, 'tex' + suffix: tex})
  return out


def train(
  o: Options, *, init: dict | None = None, sets: dict | None = None
) -> tuple[dict, list[dict]]:
  """Trains the classifier from `init` (its full params, e.g. a previous `train`'s) or from
  scratch, on `sets` (`render_sets(o)`; rendered here when None).

  Returns:
    (the classifier's params {'backbone', 'head', 'segment_head'[, 'texture_head']}, history
    of {step, loss, val_object_iou, val_accuracy (shape; when shape_weight > 0),
    val_texture_accuracy (when texture_weight > 0)}).
  """
  check(o)
  t0 = time.time()
  segment_classes = 2 if o.segment_labels == 'object' else 0
  num_textures = len(synthetic.TEXTURES) if o.texture_weight > 0 else 0
  model = Classifier(o.variant, len(synthetic.SHAPES), o.segment_sub, segment_classes, num_textures)
  sets = render_sets(o) if sets is None else sets
  x_train, y_train, s_train, tex_train = sets['x'], sets['y'], sets['seg'], sets['tex']
  x_val, y_val, s_val, tex_val = sets['x_val'], sets['y_val'], sets['seg_val'], sets['tex_val']
  if len(x_train) < o.num_scenes or len(x_val) < o.num_val:
    raise ValueError(
      f'sets hold {len(x_train)} training and {len(x_val)} validation scenes; options.num_scenes='
      f'{o.num_scenes} and num_val={o.num_val} need at least that many (render_sets(options)).'
    )
  logging.info('pretrain: %d + %d scenes in %.0f s', o.num_scenes, o.num_val, time.time() - t0)
  x0 = jnp.zeros((1, o.img_size, o.img_size, 3))
  if init is None:
    params = nn.meta.unbox(model.init(jax.random.key(o.seed), x0)['params'])
  else:
    params = jax.tree.map(jnp.asarray, init)
  sched = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, o.steps)
  tx = optax.adamw(sched, weight_decay=o.weight_decay)
  opt_state = tx.init(params)

  def loss_fn(p, x, y, seg, tex):
    logits, cell_logits, tex_logits = model.apply({'params': p}, x)
    loss = o.shape_weight * optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    seg_loss = optax.softmax_cross_entropy(cell_logits, seg).mean()
    if tex_logits is not None:
      loss += (
        o.texture_weight * optax.softmax_cross_entropy_with_integer_labels(tex_logits, tex).mean()
      )
    return loss + o.segment_weight * seg_loss

  @jax.jit
  def step(p, s, x, y, seg, tex):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y, seg, tex)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  @jax.jit
  def predict(p, x):
    logits, cell_logits, tex_logits = model.apply({'params': p}, x)
    tex = logits.argmax(-1) if tex_logits is None else tex_logits.argmax(-1)
    return logits.argmax(-1), cell_logits.argmax(-1) > 0, tex

  def metrics(p) -> dict:
    """Shape accuracy, the IoU of the cells predicted and labelled mostly object, and (with a
    texture head) texture-family accuracy."""
    pred, fg, tex = (
      np.concatenate(a)
      for a in zip(
        *[
          predict(p, transforms.imagenet_normalize(x_val[i : min(i + 256, o.num_val)]))
          for i in range(0, o.num_val, 256)
        ]
      )
    )
    true_fg = s_val[: o.num_val, ..., 0] < 0.5
    iou = np.sum(fg & true_fg) / max(1, np.sum(fg | true_fg))
    out = {'val_object_iou': float(iou)}
    if o.shape_weight > 0:  # Else the shape head is untrained: its accuracy means nothing.
      out['val_accuracy'] = float(np.mean(pred == y_val[: o.num_val]))
    if num_textures:
      out['val_texture_accuracy'] = float(np.mean(tex == tex_val[: o.num_val]))
    return out

  rng = np.random.default_rng(o.seed)
  patch = vit.create(o.variant).patch_size
  history = []
  for i in range(1, o.steps + 1):
    idx = rng.integers(0, o.num_scenes, o.batch_size)
    flip = rng.random(o.batch_size) < 0.5  # Horizontal flips, as in the demo's pipeline.
    x = np.where(flip[:, None, None, None], x_train[idx, :, ::-1], x_train[idx])
    seg = np.where(flip[:, None, None, None], s_train[idx, :, ::-1], s_train[idx])
    if o.shuffle_prob > 0:
      x, seg = shuffle_patches(x, seg, patch, rng.random(o.batch_size) < o.shuffle_prob, rng)
    params, opt_state, loss = step(
      params,
      opt_state,
      transforms.imagenet_normalize(x),
      y_train[idx],
      seg.astype(np.float32),
      tex_train[idx],
    )
    if i % o.log_every == 0 or i == o.steps:
      history.append({'step': i, 'loss': float(loss), **metrics(params)})
      logging.info('pretrain: %s (%.0f s)', history[-1], time.time() - t0)
  return params, history


def write(o: Options, out: str) -> dict:
  """Trains and writes `out` (DINOv2 keys) and `out + '.json'`; returns the JSON record."""
  params, history = train(o)
  convert.save_dinov2(params['backbone'], out)
  record = {
    'options': dataclasses.asdict(o),
    'val_accuracy': history[-1].get('val_accuracy'),
    'val_texture_accuracy': history[-1].get('val_texture_accuracy'),
    'val_object_iou': history[-1]['val_object_iou'],
    'chance': 1.0 / len(synthetic.SHAPES),
    'history': history,
    'command': f'python -m triplane3d.pretrain --out={out} (triplane3d.pretrain.Options)',
  }
  with open(out + '.json.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(out + '.json.tmp', out + '.json')
  return record


def main(argv):
  del argv
  fields = {f.name for f in dataclasses.fields(Options)}
  o = Options(**{k: v for k, v in flags.FLAGS.flag_values_dict().items() if k in fields})
  record = write(o, flags.FLAGS.out)
  found = [
    f'{name} {record[key]:.3f} (chance 0.2)'
    for key, name in (('val_accuracy', 'shape accuracy'), ('val_texture_accuracy', 'texture'))
    if record[key] is not None
  ]
  print(
    f'{flags.FLAGS.out}: validation {", ".join(found)}, object-cell IoU '
    f'{record["val_object_iou"]:.3f}'
  )


def _define_flags():
  flags.DEFINE_string('out', None, 'Output weights (.safetensors or .pth).', required=True)
  for f in dataclasses.fields(Options):
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
    define[type(f.default)](f.name, f.default, f'See triplane3d.pretrain.Options.{f.name}.')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
