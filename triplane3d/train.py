"""The 3D-Prior training loop, in chapters:

  1. mesh and hosts  2. data  3. model, optimiser, abstract state and shardings (one frozen
  `Setup`), and the jitted step  4. init or restore (and the frozen teacher)  5 + 6. the
  loop: step, log, images, checkpoints, preemption.

This file owns time (steps, epochs, schedules, checkpoints); the maths lives in models/,
render/ and losses.py. `run(config, workdir)` is what `python -m triplane3d.main` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh

from triplane3d import (
  checkpoint,
  convert,
  losses,
  optim,
  preemption,
  run_config,
  sharding,
  summaries,
)
from triplane3d.data import pipeline, prefetch, transforms
from triplane3d.evaluate import reconstruction
from triplane3d.models.prior3d import Prior3D, unbox

NUM_VIS = 4  # Examples in each image grid.


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN / Inf."""


def num_train_steps(config: mlc.ConfigDict, data: pipeline.Data) -> int:
  """train.num_steps if set, else train.num_epochs over `data` at the global batch."""
  if config.train.num_steps < 0:
    raise ValueError(
      f'train.num_steps must be >= 0 (0: use train.num_epochs), got {config.train.num_steps}.'
    )
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  steps = int(config.train.num_epochs * data.steps_per_epoch(config.train.batch_size))
  if steps <= 0:
    raise ValueError(
      f'train.num_epochs={config.train.num_epochs} at train.batch_size='
      f'{config.train.batch_size} over {data.num_examples} examples is 0 steps '
      '(partial batches are dropped): lower the batch size, raise num_epochs or set '
      'train.num_steps.'
    )
  return steps


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the trainer derives from the config and the mesh before any array exists.

  Attributes:
    model: the `Prior3D` wiring (its activations constrained to the batch sharding).
    tx, schedule: the optimiser and its learning rate per step.
    init_state: `key -> {'step', 'params', 'opt_state'}`, to run under jit.
    abstract_state: `jax.eval_shape(init_state, ...)`: the state's shapes and dtypes.
    state_shardings, param_shardings: NamedShardings of the state and of the (unboxed) params.
    mesh: the device mesh.
    num_steps: the step the run trains to.
    use_teacher: whether a frozen teacher is distilled from (loss.dist_weight > 0).
  """

  model: Prior3D
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[jax.Array], dict]
  abstract_state: Any
  state_shardings: Any
  param_shardings: Any
  mesh: Mesh
  num_steps: int
  use_teacher: bool

  @property
  def teacher_shardings(self) -> Any:
    """The teacher's shardings: the backbone's, or {} (no teacher)."""
    return self.param_shardings['backbone'] if self.use_teacher else {}


def build(config: mlc.ConfigDict, mesh: Mesh, num_steps: int) -> Setup:
  """Model, optimiser, schedule, abstract state and shardings (no arrays allocated)."""
  model = Prior3D.from_config(config, act_sharding=sharding.batch_sharding(mesh))
  rng = jax.random.key(config.seed)
  boxed = jax.eval_shape(model.init, rng)
  param_sh = sharding.logical_to_shardings(boxed, mesh)
  tx, schedule = optim.create(config.optim, unbox(boxed), num_steps)

  def init_state(key):
    params = unbox(model.init(key))
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  abstract = jax.eval_shape(init_state, rng)
  return Setup(
    model=model,
    tx=tx,
    schedule=schedule,
    init_state=init_state,
    abstract_state=abstract,
    state_shardings=sharding.state_shardings(abstract, param_sh, mesh),
    param_shardings=param_sh,
    mesh=mesh,
    num_steps=num_steps,
    use_teacher=config.loss.dist_weight > 0,
  )


def check_accum(config: mlc.ConfigDict, mesh: Mesh) -> None:
  """Refuses a `train.accum_steps` that cannot split the global batch over the mesh."""
  k, batch = config.train.accum_steps, config.train.batch_size
  if not isinstance(k, int) or k < 1:
    raise ValueError(
      f'train.accum_steps must be a positive number of micro-batches per step (1: no '
      f'accumulation), got {k!r}.'
    )
  shards = sharding.batch_shards(mesh)
  if batch % k or (batch // k) % shards:
    fits = [d for d in range(1, batch + 1) if batch % d == 0 and (batch // d) % shards == 0]
    raise ValueError(
      f'train.batch_size={batch} with train.accum_steps={k} gives micro-batches of '
      f'{batch / k:g} images, but each micro-batch is split over mesh data × fsdp = '
      f'{mesh.shape["data"]} × {mesh.shape["fsdp"]} = {shards} devices: use a '
      f'train.accum_steps in {fits}, or change train.batch_size or the mesh.'
    )


def split_batch(batch: dict, accum_steps: int, mesh: Mesh) -> dict:
  """(B, ...) leaves → (k, B/k, ...) micro-batches; micro-batch j holds images j, j + k, ....

  Strided, not contiguous: each device holds a contiguous block of B / shards images, which
  is whole rows of the (B/k, k) layout when B/k is a multiple of the shards (`check_accum`),
  so every micro-batch takes its share from every device and no image moves between them.
  """
  spec = sharding.batch_sharding(mesh).spec
  micro_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec))

  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sh)

  return jax.tree.map(split, batch)


def accumulate(grad_fn: Callable, params, batch: dict, accum_steps: int, setup: Setup):
  """The mean gradient and loss terms of `batch`, computed over k micro-batches in turn.

  Args:
    grad_fn: `(params, micro_batch, index) -> (grads, terms)`: `objective`'s gradient and
      terms on a batch; `index` is the micro-batch's number (an int32 scalar), or None when
      the batch is not split.
    params: the parameters the gradient is taken at.
    batch: the global batch, leaves (B, ...) split over the mesh's batch axes.
    accum_steps: k, the number of micro-batches of B/k images (`check_accum`).
    setup: the mesh and the parameters' shardings (those of the summed gradient).

  Returns:
    `(grads, terms)` of the whole batch: every loss term is a mean over images, so the mean of
    the micro-batches' gradients is the gradient of the whole batch (up to float rounding),
    and `losses.combine_terms` gives its terms. Memory is that of one micro-batch plus a
    float32 gradient sum, sharded like the parameters.
  """
  if accum_steps == 1:
    return grad_fn(params, batch, None)
  grad_sh = setup.state_shardings['params']
  constrain = lambda g: jax.lax.with_sharding_constraint(g, grad_sh)  # noqa: E731

  def body(grad_sum, xs):
    index, micro = xs
    grads, terms = grad_fn(params, micro, index)
    return constrain(jax.tree.map(jnp.add, grad_sum, grads)), terms

  zeros = constrain(jax.tree.map(jnp.zeros_like, params))
  indices = jnp.arange(accum_steps, dtype=jnp.int32)
  grad_sum, terms_k = jax.lax.scan(
    body, zeros, (indices, split_batch(batch, accum_steps, setup.mesh))
  )
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  return grads, losses.combine_terms(terms_k)


def float_batch(batch: dict) -> dict:
  """A batch in `pipeline.create`'s float32 layout: uint8 pixels (the trainer's wire format,
  `device_batches`) converted by `transforms.float_pixels`; a float batch as it is."""
  return transforms.float_pixels(batch) if batch['image'].dtype == jnp.uint8 else batch


def make_train_step(setup: Setup, config: mlc.ConfigDict, key: jax.Array):
  """The un-jitted step: (state, teacher, batch) → (new state, metrics).

  `batch` is a global batch in `pipeline.create`'s layout, its pixels float32 or uint8 (as
  `device_batches` gives them; converted inside, per micro-batch: `float_batch`).

  `teacher` is the frozen backbone's params (an empty dict without distillation); it is an
  input of the step, never an argument of the differentiated function. `key` is the run's
  training key; each step folds its step number in. With `train.accum_steps` = k > 1 the
  global batch is split into k micro-batches (`accumulate`) whose mean gradient takes one
  optimiser step; each image draws its rays by its place in the global batch, so every k
  renders the same rays (drop-path masks are drawn per micro-batch).
  """
  model, tx = setup.model, setup.tx
  use_drop = config.model.drop_path_rate > 0
  trainable = optim.trainable_mask(config.optim)
  check_accum(config, setup.mesh)
  accum_steps = config.train.accum_steps

  def train_step(state, teacher, batch):
    step = state['step']
    k_render, k_drop = jax.random.split(jax.random.fold_in(key, step))

    # One ray key per image, by its place in the global batch: image i draws its rays and
    # sample jitter with split(k_render, B)[i] whichever micro-batch renders it.
    ray_keys = jax.random.split(k_render, batch['image'].shape[0])

    def grad_fn(params, per_image, index):
      # Drop-path masks are drawn per (micro-)batch: micro-batch j folds j into the key.
      k_path = k_drop if index is None else jax.random.fold_in(k_drop, index)
      batch = float_batch(per_image['batch'])  # Per micro-batch: no float copy of the whole.
      images = batch['image']

      def loss_fn(params):
        h = model.representation(params['backbone'], images, rng=k_path if use_drop else None)
        h_t = None
        if setup.use_teacher:  # Named scopes: `device_time` attributes profiles by them.
          with jax.named_scope('teacher'):
            h_t = model.representation(teacher, images)
        recon = model.reconstruct(params, h, per_image['ray_key'])
        with jax.named_scope('loss'):
          return losses.objective(recon, batch, h, h_t, config.loss)

      (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return grads, terms

    per_image = {'batch': batch, 'ray_key': ray_keys}
    grads, terms = accumulate(grad_fn, state['params'], per_image, accum_steps, setup)
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
      new_params = optax.apply_updates(state['params'], updates)
    new_state = {'step': step + 1, 'params': new_params, 'opt_state': opt_state}
    # The norm of what the optimiser sees (frozen groups excluded), as clipping does.
    grad_norm = optax.tree.norm(trainable(grads))
    metrics = {**terms, 'grad_norm': grad_norm, 'lr': setup.schedule(step)}
    return new_state, metrics

  return train_step


def jit_train_step(setup: Setup, config: mlc.ConfigDict, key: jax.Array):
  """`make_train_step` under jit with explicit shardings; the state is donated.

  Inside, the model keeps activations split over the batch (`Prior3D.act_sharding`).
  """
  return jax.jit(
    make_train_step(setup, config, key),
    in_shardings=(
      setup.state_shardings,
      setup.teacher_shardings,
      sharding.batch_sharding(setup.mesh),
    ),
    out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
    donate_argnums=0,
  )


def _check_intervals(config: mlc.ConfigDict) -> None:
  for name in ('log_every_steps', 'ckpt_every_steps'):
    if config.train[name] <= 0:
      raise ValueError(
        f'train.{name} must be a positive number of steps, got {config.train[name]}.'
      )
  if config.train.image_every_steps < 0:
    raise ValueError(
      'train.image_every_steps must be a positive number of steps, or 0 for no image grids; '
      f'got {config.train.image_every_steps}.'
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


def run(config: mlc.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
  """Trains (or resumes) to `num_train_steps(config)`; returns a summary of the run.

  The resolved config is stored in the workdir (`run_config`). Resuming with a config that
  changes the run (learning rate, model, data, ...) raises `run_config.ConfigChangedError`
  listing each field, unless `allow_config_change`.

  Returns:
    {'step': last step reached, 'losses': {step: total loss} for the steps run here,
     'preempted': whether a signal stopped the run early, 'images': PNG paths written,
     'state': the final train state (sharded jax.Arrays)}.
  """
  config = _open_workdir(config, workdir, allow_config_change)

  # 1. Mesh and hosts: refuse impossible layouts before touching data or weights.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, jax.process_count())
  check_accum(config, mesh)
  logging.info('mesh %s over %d processes', dict(mesh.shape), jax.process_count())

  # 2. Data, prepared once: this host's share, checkpointable; the examples drawn in grids.
  data = pipeline.prepare(config)
  block = sharding.host_block(mesh, config.train.batch_size)
  data_iter = device_batches(config, data, mesh, block)
  vis = _grid_examples(config, data, mesh, block) if config.train.image_every_steps else None

  # 3. Model, optimiser, abstract state, shardings; the jitted step.
  setup = build(config, mesh, num_train_steps(config, data))
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  step_fn = jit_train_step(setup, config, k_train)

  ckpt = checkpoint.Checkpointer(
    workdir, keep=config.train.keep_ckpts, save_every=config.train.ckpt_every_steps
  )
  # Multi-host preemption agreement is a (tiny) blocking collective: not every step.
  guard = preemption.PreemptionGuard(sync_every_steps=config.train.preempt_sync_every_steps)
  writer = summaries.Writer(workdir)
  with ckpt, guard, contextlib.closing(data_iter):  # Closing stops the prefetch thread.
    try:
      # 4. Init or restore. The teacher is never checkpointed: it is re-created from its source.
      state, teacher, start = _init_or_restore(setup, config, ckpt, data_iter, k_init)
      writer.forget_after(start)  # Steps logged after the checkpoint will be run again.
      # 5 + 6. The loop.
      renders = _Renders(setup, config, vis, writer)
      context = _Context(data_iter, ckpt, guard, writer, renders)
      return _loop(setup, config, lambda s, b: step_fn(s, teacher, b), state, start, context)
    finally:
      writer.close()


def _open_workdir(
  config: mlc.ConfigDict, workdir: str, allow_config_change: bool
) -> mlc.ConfigDict:
  """The resolved config of a run in `workdir`, after the checks that need no devices.

  Stores the config in the workdir, or refuses a resume that changes the run.
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
  return config


def device_batches(config: mlc.ConfigDict, data, mesh: Mesh, block: int) -> prefetch.DevicePrefetch:
  """This host's training batches as global, sharded batches, `data.device_prefetch` of them
  placed ahead of the step; checkpointable.

  The pixels stay uint8 (`pipeline.create(float_pixels=False)`); the step converts them
  (`float_batch`). That is 0.61 instead of 1.65 MB per paper-sized example for the one main
  process to take from the grain workers and copy to the devices, and for each batch held
  ahead on them (docs/data.md, Throughput).
  """
  return prefetch.DevicePrefetch(
    pipeline.create(config, data, block=block, float_pixels=False),
    lambda b: sharding.to_global(b, mesh),
    config.data.device_prefetch,
  )


def _grid_examples(config: mlc.ConfigDict, data: pipeline.Data, mesh: Mesh, block: int) -> dict:
  """The examples drawn in image grids, replicated: the first batch of a fresh, in-process
  iterator, so grids show the same examples across resumes."""
  vis_config = config.copy_and_resolve_references()
  vis_config.data.num_workers = 0
  first = sharding.to_global(next(pipeline.create(vis_config, data, block=block)), mesh)
  return jax.jit(
    lambda b: {k: b[k][:NUM_VIS] for k in ('image', 'rgb', 'depth')},
    out_shardings=sharding.replicated(mesh),
  )(first)


def _init_or_restore(
  setup: Setup, config: mlc.ConfigDict, ckpt: checkpoint.Checkpointer, data_iter, key: jax.Array
) -> tuple[dict, Any, int]:
  """(state, teacher, start step): the latest checkpoint, else a fresh (or DINOv2) init."""
  abstract = sharding.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  restored = ckpt.restore_latest(abstract, data_iter)
  if not restored:
    return *initial_state(setup, config, key), 0
  start, state = restored
  logging.info('resumed from step %d', start)
  loaded = _init_from(config) if setup.use_teacher else None  # The teacher is not checkpointed.
  return state, teacher_params(setup, key, loaded), start


def initial_state(setup: Setup, config: mlc.ConfigDict, key: jax.Array) -> tuple[dict, dict]:
  """(state, teacher) of a new run: the backbone, and so the teacher, start from
  `model.init_from` if it is set, else from `key`'s initialisation."""
  loaded = _init_from(config)
  state = fresh_state(setup, key, loaded)
  return state, teacher_params(setup, key, loaded, initial_backbone=state['params']['backbone'])


def _init_from(config: mlc.ConfigDict) -> dict | None:
  """The DINOv2-format backbone weights `model.init_from` names, or None if it is unset."""
  if not config.model.init_from:
    return None
  return convert.load_dinov2(config.model.init_from, config.model.variant)


def fresh_state(setup: Setup, key: jax.Array, loaded: dict | None = None) -> dict:
  """A new train state from `key`; the backbone is `loaded` (DINOv2-format weights) if given."""
  state_sh = setup.state_shardings
  state = jax.jit(setup.init_state, out_shardings=state_sh)(key)
  if loaded is not None:
    state['params']['backbone'] = sharding.shard_like(loaded, state_sh['params']['backbone'])
  return state


def teacher_params(
  setup: Setup, key: jax.Array, loaded: dict | None = None, initial_backbone: dict | None = None
) -> dict:
  """The frozen distillation teacher: `loaded` if given, else the student's initial backbone
  (the same `key` as `fresh_state`); {} without distillation.

  `initial_backbone`: that backbone, when the fresh state is at hand: copied (the state is
  donated to the step) instead of initialising the whole model a second time, a compile of its
  own. A resumed run has no initial state and initialises from `key`: the same values, bit for
  bit (tests/test_train.py).
  """
  if not setup.use_teacher:
    return {}
  if loaded is not None:
    return sharding.shard_like(loaded, setup.teacher_shardings)
  if initial_backbone is not None:
    return jax.jit(lambda b: jax.tree.map(jnp.copy, b), out_shardings=setup.teacher_shardings)(
      initial_backbone
    )
  init_backbone = lambda k: unbox(setup.model.init(k))['backbone']  # noqa: E731
  return jax.jit(init_backbone, out_shardings=setup.teacher_shardings)(key)


class _Renders:
  """Full deterministic renders: image grids of the fixed examples, held-out metrics."""

  def __init__(self, setup: Setup, config: mlc.ConfigDict, vis: dict, writer: summaries.Writer):
    replicated = sharding.replicated(setup.mesh)
    model = setup.model
    self._render = jax.jit(
      lambda p, x: reconstruction.render_full(model, p, x), out_shardings=replicated
    )
    self._put = lambda x: jax.device_put(x, replicated)
    self._vis, self._writer, self._camera = vis, writer, model.options.camera
    self._heldout = reconstruction.heldout_scenes(config) if config.eval.num_heldout > 0 else None

  @property
  def evaluates(self) -> bool:
    """Whether held-out scenes are rendered at image steps (eval.num_heldout > 0)."""
    return self._heldout is not None

  def grid(self, step: int, params) -> str | None:
    """Draws the fixed examples' reconstructions; returns the PNG path (process 0)."""
    rgb, depth = self._render(params, self._vis['image'])
    vis = {k: np.asarray(v) for k, v in self._vis.items()}
    grid = summaries.reconstruction_grid(
      vis['image'], np.asarray(rgb), np.asarray(depth), vis['rgb'], vis['depth'],
      self._camera.near, self._camera.far,
    )  # fmt: skip
    return self._writer.image(step, grid)

  def heldout(self, params) -> dict[str, float]:
    """Metrics on the held-out scenes, with their baselines (`evaluate_heldout`)."""
    render = lambda p, x: self._render(p, self._put(x))  # noqa: E731
    return reconstruction.evaluate_heldout(render, params, self._heldout)


@dataclasses.dataclass(frozen=True)
class _Context:
  """What the loop works with besides the step: data, checkpoints, the preemption guard,
  logs and renders."""

  data_iter: prefetch.DevicePrefetch
  ckpt: checkpoint.Checkpointer
  guard: preemption.PreemptionGuard
  writer: summaries.Writer
  renders: _Renders


class _Meter:
  """Step metrics, fetched one step late so the host never waits for the step in flight;
  refused when non-finite (before anything is saved); averaged and timed per log window.

  The first step of a process compiles: it is timed on its own and left out of the images/s
  window (it would read 1–5 img/s against a steady 30–50 on 2 CPU cores). `data_wait` is the
  share of the window the loop spent blocked for a batch that was not ready
  (`prefetch.DevicePrefetch.waited_s`): with the steps dispatched ahead and the next batch
  placed during a step, only an input pipeline slower than the devices makes it wait.
  """

  def __init__(self, ckpt: checkpoint.Checkpointer):
    self._ckpt = ckpt
    self.losses: dict[int, float] = {}  # step -> total loss, for the steps run here.
    self.first_step_s: float | None = None
    self._pending = None  # (step, device metrics) of the last dispatched step.
    self._window: list[dict] = []
    self._steps = 0  # Steps in the window, the compiling first step excluded.
    self._logged_first = False
    self._t0 = time.perf_counter()
    self._waited = 0.0  # Seconds spent waiting for batches in the window.

  def add(self, step: int, metrics: dict, *, first: bool, waited: float = 0.0) -> None:
    """Queues `step`'s metrics after fetching the previous step's (while this one runs);
    `waited`: the seconds the loop waited for this step's batch."""
    self.drain()
    self._pending = (step, metrics)
    if first:
      jax.block_until_ready(metrics)
      self.first_step_s = time.perf_counter() - self._t0
      if jax.process_index() == 0:
        tqdm_write(f'step {step}: compiled and ran the first step in {self.first_step_s:.1f} s')
      self._t0 = time.perf_counter()
    else:
      self._steps += 1
      self._waited += waited

  def drain(self) -> None:
    """Fetches the pending step's metrics, refusing NaN/Inf."""
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(host['total']) and math.isfinite(host['grad_norm'])):
      last = self._ckpt.latest_step
      kept = f'the last good checkpoint is step {last}' if last else 'no checkpoint was written'
      raise NonFiniteLossError(
        f'non-finite loss at step {step}: {host}. Stopped without saving this state; {kept}. '
        'Lower optim.lr, enable optim.grad_clip_norm, or check the data.'
      )
    self.losses[step] = host['total']
    self._window.append(host)

  def window(self, batch_size: int) -> dict[str, float]:
    """The means over the window up to the last step (and its images/s); starts a new one.

    A process's first window also says what compiling took (`first_step_s`).
    """
    self.drain()
    dt = time.perf_counter() - self._t0
    means = {k: float(np.mean([w[k] for w in self._window])) for k in self._window[0]}
    if self._steps:
      means['images_per_sec'] = self._steps * batch_size / max(dt, 1e-9)
      means['data_wait'] = self._waited / max(dt, 1e-9)
    if not self._logged_first:
      means['first_step_s'] = self.first_step_s
      self._logged_first = True
    self._window.clear()
    self._steps = 0
    self._waited = 0.0
    return means

  def restart_clock(self) -> None:
    """Times a new window from now, after any image or checkpoint work, if one just began."""
    if self._steps == 0:
      self._t0 = time.perf_counter()
      self._waited = 0.0


def _loop(
  setup: Setup,
  config: mlc.ConfigDict,
  step_fn: Callable,
  state: dict,
  start: int,
  context: _Context,
) -> dict:
  """Steps from `start` to `setup.num_steps`: log, draw, checkpoint, stop on preemption or NaN.

  `step_fn(state, batch) -> (state, metrics)`. Image grids are drawn at step 0 of a new run,
  every `train.image_every_steps` and at the end (never with 0). With held-out scenes
  (`eval.num_heldout`), they are rendered at every image step after the first and at the
  end; their numbers are printed and join that step's line of metrics.jsonl as
  `heldout/<name>` (each step keeps one line); the last ones go into the result.
  """
  train_cfg, ctx = config.train, context
  result = {'step': start, 'losses': {}, 'preempted': False, 'images': []}
  meter = _Meter(ctx.ckpt)
  result['losses'] = meter.losses
  bar = _progress(start, setup.num_steps)

  def draw(step):
    path = ctx.renders.grid(step, state['params'])
    if path:
      result['images'].append(path)

  every = train_cfg.image_every_steps  # 0: no grids (each costs a render program's compile).
  last_wait = None  # The previous log window's data_wait.
  try:
    if start == 0 and every:
      draw(0)
    meter.restart_clock()
    step = start
    while step < setup.num_steps:
      waited = ctx.data_iter.waited_s
      batch = next(ctx.data_iter)  # Global and sharded already (`prefetch`).
      waited = ctx.data_iter.waited_s - waited
      state, metrics = step_fn(state, batch)
      step += 1
      meter.add(step, metrics, first=step == start + 1, waited=waited)
      stop = ctx.guard.should_stop(step)
      last = step == setup.num_steps
      image_step = bool(every) and (step % every == 0 or last)
      evaluate = ctx.renders.evaluates and (image_step or last)
      if step % train_cfg.log_every_steps == 0 or last or stop or evaluate:
        means = meter.window(train_cfg.batch_size)
        heldout = {}
        if evaluate:
          result['heldout'] = ctx.renders.heldout(state['params'])
          heldout = {f'heldout/{k}': v for k, v in result['heldout'].items()}
          if jax.process_index() == 0:
            tqdm_write(f'step {step}: held-out {reconstruction.describe(result["heldout"])}')
        ctx.writer.scalars(step, {**means, **heldout})
        bar.update(step, means)
        if 'densities_died' not in result and jax.process_index() == 0:
          if warn_if_densities_died(step, means, config):
            result['densities_died'] = step  # Warned once, at this step.
        if 'input_bound' not in result and jax.process_index() == 0:
          if warn_if_input_bound(step, means.get('data_wait'), last_wait, config):
            result['input_bound'] = step
        last_wait = means.get('data_wait')
      if image_step:
        draw(step)
      if stop or last or ctx.ckpt.due(step):
        meter.drain()  # A non-finite step is never saved.
        ctx.ckpt.save(step, state, ctx.data_iter, force=True)
      meter.restart_clock()
      if stop:
        logging.warning('preempted: saved step %d, exiting cleanly.', step)
        result['preempted'] = True
        break
    result['step'] = step
    if meter.first_step_s is not None:
      result['first_step_s'] = meter.first_step_s
  finally:
    bar.close()
  result['state'] = state
  return result


# Below this mean activated density (loss term 'norm' with loss.norm_reduction 'mean') every
# ray is empty: healthy runs log 0.1–2. Softplus then passes ~e^raw of the colour gradient, so
# colour never trains again, while the depth loss (a weighted mean over the ray, scale-free)
# keeps training (docs/reconstruction.md, "Density death").
DEAD_DENSITY = 1e-12


def warn_if_densities_died(step: int, means: dict, config: mlc.ConfigDict) -> bool:
  """Logs a warning naming the fix when the window's densities have collapsed to zero; returns
  whether it did. Only the triplane decoder has densities ('norm' is 0 by definition for the
  conv ablation), and only the 'mean' reduction has a scale-free threshold."""
  if config.decoder.kind != 'triplane' or config.loss.get('norm_reduction', 'mean') != 'mean':
    return False
  norm = means.get('norm')
  if norm is None or not 0.0 <= norm < DEAD_DENSITY:
    return False
  logging.warning(
    'step %d: every density has collapsed to ~0 (loss/norm %.3g): the renders are empty and '
    'the colour loss has no gradient left, so this run will not recover. Restart with a '
    'smaller optim.lr or a warm-up (optim.warmup_steps=20); docs/reconstruction.md, '
    '"Density death".',
    step,
    norm,
  )
  return True


# Two log windows in a row whose loop waited this share of their time for data are input-bound.
INPUT_BOUND = 0.1


def warn_if_input_bound(
  step: int, wait: float | None, previous: float | None, config: mlc.ConfigDict
) -> bool:
  """Logs a warning naming the fix when the loop waited for data more than `INPUT_BOUND` of the
  time in this log window and the one before (`data_wait`; one slow window is a hiccup: a
  worker starting, a slow read); returns whether it did."""
  if wait is None or previous is None or min(wait, previous) <= INPUT_BOUND:
    return False
  sync = ''
  if config.data.device_prefetch == 0:
    sync = (
      ' data.device_prefetch=0 draws and places each batch while the devices wait: set it to '
      '1 first.'
    )
  logging.warning(
    'step %d: the loop waited %.0f%% and %.0f%% of the last two log windows for its next '
    'batch: the input pipeline is the bottleneck.%s Raise --config.data.num_workers (now %d) '
    'or data.prefetch; `python -m triplane3d.benchmark --mode=data --accelerator=...` '
    'measures what a host needs (docs/data.md, "Throughput").',
    step,
    100 * previous,
    100 * wait,
    sync,
    config.data.num_workers,
  )
  return True


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
