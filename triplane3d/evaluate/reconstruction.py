"""Is the proxy task learning? Reconstruction quality beside trivial baselines.

A falling loss is not evidence that the triplanes learn shape. Every number here is reported
beside what a model that ignores the geometry gets on the same images:

  mean colour     each image predicted as its own mean colour (an oracle: it sees the target);
  constant depth  each image's depth predicted as the set's per-pixel median depth map for
                  the mean |error| (the constant with the least |error|) and as its per-pixel
                  mean map for the RMSE (the constant with the least squared error); one
                  image: its median / mean depth. On the demo's held-out scenes the median map
                  has |err| 0.047, the mean map 0.059, 'far everywhere' 0.055: a model
                  trained with squared error (the paper's L_depth) hedges towards the mean, so
                  judge it by the RMSE, and by |err| against the median.

Metrics: PSNR in dB of the rendered RGB (clipped to [0, 1]) averaged over images, and the mean
|depth error| and depth RMSE over all pixels in scene units (the camera's far − near is the
depth range).

`overfit_scene` trains the model of a config on one synthetic scene with the trainer's own step
(benchmarks/overfit_one_scene.py and the CI test call it): a model that cannot overfit one scene
cannot learn a dataset.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from triplane3d import render
from triplane3d.data import pipeline, synthetic
from triplane3d.render.camera import Camera


def psnr_per_image(pred_bhw3: np.ndarray, target_bhw3: np.ndarray) -> np.ndarray:
  """PSNR (dB) of each image, predictions clipped to [0, 1]: (B,)."""
  err = np.square(np.clip(pred_bhw3, 0, 1) - target_bhw3).reshape(len(pred_bhw3), -1)
  return 10.0 * np.log10(1.0 / np.maximum(err.mean(axis=1), 1e-10))


def baselines(rgb_bhw3: np.ndarray, depth_bhw1: np.ndarray) -> dict[str, float]:
  """The trivial predictors' metrics on a set of targets (see module docstring)."""
  rgb = np.asarray(rgb_bhw3, np.float64)
  depth = np.asarray(depth_bhw1, np.float64)
  mean_colour = np.broadcast_to(rgb.mean(axis=(1, 2), keepdims=True), rgb.shape)
  one = len(depth) == 1  # One image: its per-pixel statistics are itself; use its own.
  median = np.median(depth, keepdims=True) if one else np.median(depth, axis=0, keepdims=True)
  mean = depth.mean(keepdims=True) if one else depth.mean(axis=0, keepdims=True)
  return {
    'psnr': float(psnr_per_image(mean_colour, rgb).mean()),
    'depth_abs': float(np.abs(median - depth).mean()),
    'depth_rmse': float(np.sqrt(np.square(mean - depth).mean())),
  }


def metrics(rgb_bhw3, depth_bhw1, target_rgb, target_depth) -> dict[str, float]:
  """PSNR (mean over images), mean |depth error| and depth RMSE of renders against targets."""
  err = np.asarray(depth_bhw1, np.float64) - np.asarray(target_depth, np.float64)
  return {
    'psnr': float(psnr_per_image(np.asarray(rgb_bhw3), np.asarray(target_rgb)).mean()),
    'depth_abs': float(np.abs(err).mean()),
    'depth_rmse': float(np.sqrt(np.square(err).mean())),
  }


def render_full(model, params, images_bhw3):
  """Deterministic full renders (jittable): (rgb (B, R, R, 3), depth (B, R, R, 1))."""
  h = model.representation(params['backbone'], images_bhw3)
  out = model.reconstruct(params, h, jax.random.key(0), full=True)
  r = model.options.resolution
  return render.to_image(out['rgb'], r), render.to_image(out['depth'], r)


def scene_example(
  config: mlc.ConfigDict, index: int, seed: int | None = None, *, as_trained: bool = False
) -> dict:
  """Synthetic scene `index` through the production decode path, whole image (no crop/flip).

  With the training set's textures, and the exact depth unless `as_trained` (then the depth
  the training set stores: degraded when data.synthetic_depth_* ask for it).

  Returns 'image' (1, S, S, 3), 'rgb' (1, R, R, 3), 'depth' (1, R, R, 1) numpy arrays.
  """
  camera = Camera.from_config(config.camera)
  res = synthetic.default_resolution(config.render.resolution, config.model.img_size)
  seed = config.seed if seed is None else seed
  kw = pipeline.synthetic_options(config)
  if as_trained:
    kw.update(pipeline.synthetic_depth_options(config))
  image, depth = synthetic.example(index, seed, camera, res, **kw)
  record = {
    'image': image['image'],
    'label': image['label'],
    'key': image['file_name'],
    'depth': depth['depth'],
    'depth_range': np.asarray(depth['depth_range'], np.float32),
  }
  ex = pipeline.augmentation(config, whole_image=True).random_map(record, np.random.default_rng(0))
  return {k: ex[k][None] for k in ('image', 'rgb', 'depth')}


def heldout_scenes(config: mlc.ConfigDict) -> dict[str, np.ndarray]:
  """The held-out synthetic scenes [num_synthetic, num_synthetic + eval.num_heldout), whole.

  Same generator and seed as the training set, disjoint indices: never trained on. Returns
  'image' (N, S, S, 3), 'rgb' (N, R, R, 3), 'depth' (N, R, R, 1).
  """
  if config.data.source != 'synthetic':
    raise ValueError(
      f"eval.num_heldout > 0 needs data.source='synthetic' (got {config.data.source!r}); "
      'set eval.num_heldout=0 for other sources.'
    )
  first = int(config.data.num_synthetic)
  examples = [scene_example(config, i) for i in range(first, first + int(config.eval.num_heldout))]
  return {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}


def evaluate_heldout(render_fn, params, heldout: dict, batch: int = 16) -> dict[str, float]:
  """Metrics of `render_fn(params, images) -> (rgb, depth)` on held-out scenes, with baselines.

  Returns {'psnr', 'depth_abs', 'depth_rmse', 'baseline_psnr' (mean colour),
  'baseline_depth_abs' (median map), 'baseline_depth_rmse' (mean map)}.
  """
  rgb, depth = [], []
  for i in range(0, len(heldout['image']), batch):
    r, d = render_fn(params, heldout['image'][i : i + batch])
    rgb.append(np.asarray(r))
    depth.append(np.asarray(d))
  m = metrics(np.concatenate(rgb), np.concatenate(depth), heldout['rgb'], heldout['depth'])
  base = baselines(heldout['rgb'], heldout['depth'])
  return {**m, **{f'baseline_{k}': v for k, v in base.items()}}


def describe(m: dict[str, float]) -> str:
  """One line for people: model vs baselines."""
  return (
    f'PSNR {m["psnr"]:.2f} dB (mean colour {m["baseline_psnr"]:.2f} dB), '
    f'depth |err| {m["depth_abs"]:.4f} (median map {m["baseline_depth_abs"]:.4f}), '
    f'RMSE {m["depth_rmse"]:.4f} (mean map {m["baseline_depth_rmse"]:.4f})'
  )


def overfit_scene(
  config: mlc.ConfigDict, scene: int, num_steps: int, *, every: int = 25, verbose=False
) -> dict:
  """Trains `config`'s model on one synthetic scene (batch of 1) with the trainer's step.

  Returns {'curve': [{'step', 'psnr', 'depth_abs', 'loss', 'time_s'}...], 'baselines'}.
  """
  from triplane3d import sharding, train  # Lazily: the trainer imports this module.

  config = config.copy_and_resolve_references()
  config.train.batch_size = 1
  config.mesh.data, config.mesh.fsdp = 1, 1
  batch = {k: jnp.asarray(v) for k, v in scene_example(config, scene).items()}
  setup = train.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]), num_steps)
  model = setup.model
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  state, teacher = train.initial_state(setup, config, k_init)  # As train.run starts.
  step_fn = jax.jit(train.make_train_step(setup, config, k_train))
  render = jax.jit(lambda p, x: render_full(model, p, x))
  target_rgb, target_depth = np.asarray(batch['rgb']), np.asarray(batch['depth'])
  curve = []
  start = time.perf_counter()
  loss = float('nan')
  for step in range(num_steps + 1):
    if step % every == 0 or step == num_steps:
      rgb, depth = (np.asarray(a) for a in render(state['params'], batch['image']))
      m = metrics(rgb, depth, target_rgb, target_depth)
      curve.append({'step': step, **m, 'loss': loss, 'time_s': time.perf_counter() - start})
      if verbose:
        print(f'step {step:4d}  PSNR {m["psnr"]:6.2f} dB  depth |err| {m["depth_abs"]:.4f}'
              f'  RMSE {m["depth_rmse"]:.4f}  loss {loss:.4g}  {curve[-1]["time_s"]:.0f} s',
              flush=True)  # fmt: skip
    if step < num_steps:
      state, terms = step_fn(state, teacher, batch)
      loss = float(terms['total'])
  return {
    'curve': curve,
    'baselines': baselines(target_rgb, target_depth),
    'final': {'image': np.asarray(batch['image']), 'rgb': rgb, 'depth': depth,
              'target_rgb': target_rgb, 'target_depth': target_depth},
  }  # fmt: skip
