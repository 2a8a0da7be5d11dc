"""The 3D-Prior training loop, in chapters:

  1. mesh and hosts  2. data  3. model, optimiser, abstract state and shardings
  4. init or restore (and the frozen teacher)  5. the jitted step  6. the loop: log, images,
  checkpoints, preemption.

This file owns time (steps, epochs, schedules, checkpoints); the maths lives in models/,
render/ and losses.py. `run(config, workdir)` is what `python -m triplane3d.main` calls.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from triplane3d import checkpoint, convert, losses, optim, run_config, sharding, summaries
from triplane3d.data import pipeline
from triplane3d.evaluate import reconstruction
from triplane3d.models.prior3d import Prior3D, unbox

NUM_VIS = 4  # Examples in each image grid.


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN / Inf."""


def num_train_steps(config) -> int:
  """train.num_steps if set, else train.num_epochs over the (sub)set at the global batch."""
  if config.train.num_steps < 0:
    raise ValueError(
      f'train.num_steps must be >= 0 (0: use train.num_epochs), got {config.train.num_steps}.'
    )
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  steps = int(config.train.num_epochs * pipeline.steps_per_epoch(config))
  if steps <= 0:
    raise ValueError(
      f'train.num_epochs={config.train.num_epochs} at train.batch_size='
      f'{config.train.batch_size} over {pipeline.num_examples(config)} examples is 0 steps '
      '(partial batches are dropped): lower the batch size, raise num_epochs or set '
      'train.num_steps.'
    )
  return steps


def _global_put(tree: Any, shardings: Any) -> Any:
  """Host numpy arrays (identical on every process) → global jax.Arrays on `shardings`."""

  def put(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings)


def build(config, mesh):
  """Model, optimiser, schedule, abstract state and shardings (no arrays allocated)."""
  model = Prior3D.from_config(config, act_sharding=sharding.batch_sharding(mesh))
  num_steps = num_train_steps(config)
  rng = jax.random.key(config.seed)
  boxed = jax.eval_shape(model.init, rng)
  param_sh = sharding.logical_to_shardings(boxed, mesh)
  tx, sched = optim.create(config.optim, unbox(boxed), num_steps)

  def init_state(key):
    params = unbox(model.init(key))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init_state, rng)
  state_sh = sharding.state_shardings(abstract, param_sh, mesh)
  return model, tx, sched, init_state, abstract, state_sh, param_sh, num_steps


def make_train_step(model: Prior3D, tx, sched, config, base_key, use_teacher: bool):
  """The un-jitted step: (state, teacher, batch) → (new state, metrics).

  `teacher` is the frozen backbone's params (an empty dict without distillation); it is an
  input of the step, never an argument of the differentiated function.
  """
  use_drop = config.model.drop_path_rate > 0
  trainable = optim.trainable_mask(config.optim)

  def train_step(state, teacher, batch):
    step = state['step']
    k_render, k_drop = jax.random.split(jax.random.fold_in(base_key, step))

    def loss_fn(params):
      h = model.representation(params['backbone'], batch['image'], rng=k_drop if use_drop else None)
      h_t = model.representation(teacher, batch['image']) if use_teacher else None
      recon = model.reconstruct(params, h, k_render)
      return losses.objective(recon, batch, h, h_t, config.loss)

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {
      'step': step + 1,
      'params': optax.apply_updates(state['params'], updates),
      'opt_state': opt_state,
    }
    # The norm of what the optimiser sees (frozen groups excluded), as clipping does.
    grad_norm = optax.tree.norm(trainable(grads))
    metrics = {**terms, 'grad_norm': grad_norm, 'lr': sched(step)}
    return new_state, metrics

  return train_step


def jit_train_step(model, tx, sched, config, base_key, mesh, state_sh, param_sh, use_teacher):
  """`make_train_step` under jit with explicit shardings; the state is donated.

  Inside, the model keeps activations split over the batch (`Prior3D.act_sharding`).
  """
  return jax.jit(
    make_train_step(model, tx, sched, config, base_key, use_teacher),
    in_shardings=(
      state_sh,
      param_sh['backbone'] if use_teacher else {},
      sharding.batch_sharding(mesh),
    ),
    out_shardings=(state_sh, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def _check_intervals(config) -> None:
  for name in ('log_every_steps', 'image_every_steps', 'ckpt_every_steps'):
    if config.train[name] <= 0:
      raise ValueError(
        f'train.{name} must be a positive number of steps, got {config.train[name]}.'
      )
  if config.train.keep_ckpts < 1:
    # 0 would delete every checkpoint, the one just written and those of a reused workdir.
    raise ValueError(
      f'train.keep_ckpts must be >= 1 (checkpoints kept), got {config.train.keep_ckpts}.'
    )


# Weight files `model.init_from` may name; with one of these endings it is never a hub name.
_WEIGHT_FILES = ('.pth', '.pt', '.bin', '.safetensors', '.msgpack', '.npz', '.pkl')


def _check_init_from(init_from: str) -> None:
  """A mistyped local path is "file not found", not a failed Hugging Face download.

  Hub names are `org/name`; anything else that does not exist (an absolute or relative path
  with more parts, a weights-file ending, a first part that is a local directory) is a path.
  """
  if not init_from or os.path.exists(init_from):
    return
  hub_name = (
    re.fullmatch(r'[\w-][\w.-]*/[\w.-]+', init_from)
    and not init_from.endswith(_WEIGHT_FILES)
    and not os.path.isdir(init_from.split('/')[0])
  )
  if hub_name:
    return
  tilde = ' ("~" is not expanded: write the full path)' if init_from.startswith('~') else ''
  raise FileNotFoundError(
    f'model.init_from: file not found: {os.path.abspath(init_from)}{tilde} (given '
    f'{init_from!r}, relative to {os.getcwd()}). Fix the path, or name a Hugging Face hub '
    "model as org/name (e.g. 'facebook/dinov2-base')."
  )


def run(config, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Trains (or resumes) to `num_train_steps(config)`; returns a summary of the run.

  The resolved config is stored in the workdir (`run_config`). Resuming with a config that
  changes the run (learning rate, model, data, ...) raises `run_config.ConfigChangedError`
  listing each field, unless `allow_config_change`.

  Returns:
    {'step': last step reached, 'losses': {step: total loss} for the steps run here,
     'preempted': whether a signal stopped the run early, 'images': PNG paths written,
     'state': the final train state (sharded jax.Arrays)}.
  """
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  config = config.copy_and_resolve_references()
  config.workdir = workdir
  _check_intervals(config)
  resuming = bool(checkpoint.finished_steps(workdir))
  if config.loss.dist_weight > 0 or not resuming:  # Otherwise init_from is not read.
    _check_init_from(config.model.init_from)
  run_config.check_resume(
    workdir,
    config,
    resuming=resuming,
    allow_change=allow_config_change,
    write_files=jax.process_index() == 0,
  )

  # 1. Mesh and hosts: refuse impossible layouts before touching data or weights.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, jax.process_count())
  logging.info('mesh %s over %d processes', dict(mesh.shape), jax.process_count())

  # 2. Data: this host's share, checkpointable.
  block = pipeline.host_block(mesh, config.train.batch_size)
  data_iter = pipeline.create(config, process_index=block)
  # The examples drawn in image grids: the first batch of a fresh, in-process iterator, so
  # grids show the same examples across resumes.
  vis_config = config.copy_and_resolve_references()
  vis_config.data.num_workers = 0
  vis = jax.jit(
    lambda b: {k: b[k][:NUM_VIS] for k in ('image', 'rgb', 'depth')},
    out_shardings=sharding.replicated(mesh),
  )(pipeline.to_global(next(pipeline.create(vis_config, process_index=block)), mesh))

  # 3. Model, optimiser, abstract state, shardings.
  model, tx, sched, init_state, abstract, state_sh, param_sh, num_steps = build(config, mesh)
  use_teacher = config.loss.dist_weight > 0
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  step_fn = jit_train_step(model, tx, sched, config, k_train, mesh, state_sh, param_sh, use_teacher)
  # Full deterministic renders (image grids, held-out metrics): (rgb, depth) images.
  visualize = jax.jit(
    lambda p, x: reconstruction.render_full(model, p, x), out_shardings=sharding.replicated(mesh)
  )

  heldout_eval = None
  if config.eval.num_heldout > 0:
    heldout = reconstruction.heldout_scenes(config)

    def heldout_eval(params):
      put = lambda x: jax.device_put(x, sharding.replicated(mesh))  # noqa: E731
      return reconstruction.evaluate_heldout(lambda p, x: visualize(p, put(x)), params, heldout)

  ckpt = checkpoint.Checkpointer(
    workdir, keep=config.train.keep_ckpts, save_every=config.train.ckpt_every_steps
  )
  # Multi-host preemption agreement is a (tiny) blocking collective: not every step.
  guard = checkpoint.PreemptionGuard(sync_every_steps=config.train.preempt_sync_every_steps)
  writer = summaries.Writer(workdir)
  with ckpt, guard:
    try:
      # 4. Init or restore. The teacher is never checkpointed: it is re-created from its source.
      state, teacher, start = _init_or_restore(
        config, model, init_state, abstract, state_sh, param_sh, ckpt, data_iter, k_init
      )
      writer.forget_after(start)  # Steps logged after the checkpoint will be run again.
      # 5 + 6. The loop.
      return _loop(
        config, model, step_fn, visualize, mesh, state, teacher, start, num_steps, data_iter,
        vis, ckpt, guard, writer, heldout_eval=heldout_eval,
      )  # fmt: skip
    finally:
      writer.close()


def _init_or_restore(config, model, init_state, abstract, state_sh, param_sh, ckpt, it, k_init):
  """(state, teacher, start step): the latest checkpoint, else a fresh (or DINOv2) init."""
  use_teacher = config.loss.dist_weight > 0
  restored = ckpt.restore_latest(sharding.abstract_with_shardings(abstract, state_sh), it)
  loaded = None
  if config.model.init_from and (use_teacher or not restored):
    loaded = convert.load_dinov2(config.model.init_from, config.model.variant)
  if restored:
    start, state = restored
    logging.info('resumed from step %d', start)
  else:
    start = 0
    state = jax.jit(init_state, out_shardings=state_sh)(k_init)
    if loaded is not None:
      state['params']['backbone'] = _global_put(loaded, state_sh['params']['backbone'])
  teacher = {}
  if use_teacher:
    teacher_sh = param_sh['backbone']
    if loaded is not None:
      teacher = _global_put(loaded, teacher_sh)
    else:  # From scratch with distillation: the teacher is the student's random init.
      teacher = jax.jit(lambda k: unbox(model.init(k))['backbone'], out_shardings=teacher_sh)(
        k_init
      )
  return state, teacher, start


def _loop(config, model, step_fn, visualize, mesh, state, teacher, start, num_steps, data_iter,
          vis, ckpt, guard, writer, heldout_eval=None) -> dict:  # fmt: skip
  """Steps from `start` to `num_steps`: log, draw, checkpoint, stop on preemption or NaN.

  `heldout_eval(params) -> metrics` (optional) runs at every image step after the first and
  at the end; its numbers are printed and join that step's line of metrics.jsonl as
  `heldout/<name>` (each step keeps one line); the last ones go into the result.
  """
  result = {'step': start, 'losses': {}, 'preempted': False, 'images': []}
  pending = None  # (step, device metrics) of the last dispatched step, checked one step late.
  window: list[dict] = []
  t_window, n_window = time.perf_counter(), 0
  logged_first = False
  bar = _progress(start, num_steps)
  camera = model.options.camera
  train_cfg = config.train

  def drain():
    """Fetches the pending step's metrics, refusing NaN/Inf before anything is saved."""
    nonlocal pending
    if pending is None:
      return
    s, m = pending
    pending = None
    host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not (math.isfinite(host['total']) and math.isfinite(host['grad_norm'])):
      last = ckpt.latest_step
      kept = f'the last good checkpoint is step {last}' if last else 'no checkpoint was written'
      raise NonFiniteLossError(
        f'non-finite loss at step {s}: {host}. Stopped without saving this state; {kept}. '
        'Lower optim.lr, enable optim.grad_clip_norm, or check the data.'
      )
    result['losses'][s] = host['total']
    window.append(host)

  def save_images(step):
    rgb, depth = visualize(state['params'], vis['image'])
    grid = summaries.reconstruction_grid(
      np.asarray(vis['image']),
      np.asarray(rgb),
      np.asarray(depth),
      np.asarray(vis['rgb']),
      np.asarray(vis['depth']),
      camera.near,
      camera.far,
    )
    path = writer.image(step, grid)
    if path:
      result['images'].append(path)

  try:
    if start == 0:
      save_images(0)
    t_window = time.perf_counter()
    step = start
    while step < num_steps:
      batch = pipeline.to_global(next(data_iter), mesh)
      state, metrics = step_fn(state, teacher, batch)
      drain()  # The previous step's metrics, while this step runs.
      pending = (step + 1, metrics)
      step += 1
      if step == start + 1:
        # The first step of a process compiles: timed on its own, and left out of the
        # images/s window (it would read 1–5 img/s against a steady 30–50 on 2 CPU cores).
        jax.block_until_ready(metrics)
        result['first_step_s'] = time.perf_counter() - t_window
        if jax.process_index() == 0:
          tqdm_write(
            f'step {step}: compiled and ran the first step in {result["first_step_s"]:.1f} s'
          )
        t_window = time.perf_counter()
      else:
        n_window += 1
      stop = guard.should_stop(step)
      last = step == num_steps
      image_step = step % train_cfg.image_every_steps == 0 or last
      evaluate = heldout_eval is not None and image_step
      if step % train_cfg.log_every_steps == 0 or last or stop or evaluate:
        drain()
        dt = time.perf_counter() - t_window
        means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        if n_window:
          means['images_per_sec'] = n_window * train_cfg.batch_size / max(dt, 1e-9)
        if not logged_first:  # This process's first log line also says what compiling took.
          means['first_step_s'] = result['first_step_s']
          logged_first = True
        heldout = {}
        if evaluate:
          result['heldout'] = heldout_eval(state['params'])
          heldout = {f'heldout/{k}': v for k, v in result['heldout'].items()}
          if jax.process_index() == 0:
            tqdm_write(f'step {step}: held-out {reconstruction.describe(result["heldout"])}')
        writer.scalars(step, {**means, **heldout})
        bar.update(step, means)
        window.clear()
        n_window = 0
      if image_step:
        save_images(step)
      if stop or last or step % train_cfg.ckpt_every_steps == 0:
        drain()
        ckpt.save(step, state, data_iter, force=stop or last)
      if n_window == 0:  # A log step (or the first step) just ended: time the next window from
        # here, after any image or checkpoint work.
        t_window = time.perf_counter()
      if stop:
        logging.warning('preempted: saved step %d, exiting cleanly.', step)
        result['preempted'] = True
        break
    result['step'] = step
  finally:
    bar.close()
  result['state'] = state
  return result


def tqdm_write(line: str) -> None:
  """Prints above the progress bar (and to the log)."""
  from tqdm import tqdm

  tqdm.write(line)
  logging.info(line)


class _progress:
  """A tqdm bar on process 0 (step, losses, images/s, ETA); silent elsewhere."""

  def __init__(self, start: int, total: int):
    self._bar = None
    if jax.process_index() == 0:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, desc='train', unit='step', dynamic_ncols=True)
    self._last = start

  def update(self, step: int, means: dict) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._last)
    self._last = step
    keys = ('total', 'rgb', 'depth', 'dist', 'psnr', 'images_per_sec')
    self._bar.set_postfix({k: f'{means[k]:.4g}' for k in keys if k in means}, refresh=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
