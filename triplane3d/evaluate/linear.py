"""DINOv2 linear probe on frozen features: a grid of linear heads trained in one jitted program.

Shapes: features x (N, D), labels y (N,) ints in [0, num_classes); a grid of L heads is
w_ldc (L, D, C) and b_lc (L, C); one chosen head is {'w': (D, C), 'b': (C,)}.

The recipe of dinov2/eval/linear.py: one head per learning rate in LEARNING_RATES, each scaled by
batch_size / 256; weights N(0, 0.01²), biases 0; cross-entropy; SGD momentum 0.9, no weight
decay; cosine decay to 0 over the whole run (PyTorch's CosineAnnealingLR, stepped each
iteration); every head sees the same shuffled batches (drop-last); the head with the best
validation top-1 wins, ties going to the earlier head. DINOv2 runs 10 epochs of 1250 iterations
at a global batch of 1024 (12,500 iterations, about 10 ImageNet epochs): the defaults here.

Feature variants (last 1 or 4 blocks' class tokens, with or without the mean patch token) are
separate (N, D_v) arrays; fit_and_score_variants trains one grid per variant on the same batches
and picks the best (variant, lr) pair. Training features are either one (N, D_v) array (the
"fast mode": features of the evaluation crop every epoch) or a callable epoch -> (N, D_v), the
features of that epoch's augmented views (DINOv2's random-resized crop + flip; probe.py), read
once per epoch for all variants.

`class_subset` (e.g. ImageNet-R's 200 ImageNet classes) restricts the argmax to those logits at
scoring time; labels stay in the full [0, num_classes) index space.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
_INIT_STD = 0.01
_MOMENTUM = 0.9
_PREDICT_CHUNK = 4096  # Rows per prediction call: bounds the (L, chunk, C) logits in memory.


def scale_lr(lr: float, batch_size: int) -> float:
  """DINOv2's linear scaling of a base learning rate by the global batch size."""
  return lr * batch_size / 256.0


def init_heads(num_heads: int, dim: int, num_classes: int, seed: int = 0):
  """(w_ldc, b_lc): the same N(0, 0.01²) init for every head, so heads differ only by lr."""
  w = _INIT_STD * jax.random.normal(jax.random.key(seed), (dim, num_classes), jnp.float32)
  return jnp.tile(w[None], (num_heads, 1, 1)), jnp.zeros((num_heads, num_classes), jnp.float32)


def _loss(params, x_bd, y_b):
  logits = x_bd @ params['w'] + params['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y_b).mean()


def _make_tx(lr, total_steps: int):
  """One head's optimiser; lr is that head's (traced) scaled learning rate."""
  schedule = optax.cosine_decay_schedule(lr, decay_steps=total_steps)
  return optax.sgd(schedule, momentum=_MOMENTUM)


@functools.partial(jax.jit, static_argnames=('total_steps',))
def _init_opt(params, lrs_l, *, total_steps):
  return jax.vmap(lambda p, lr: _make_tx(lr, total_steps).init(p))(params, lrs_l)


@functools.partial(jax.jit, static_argnames=('total_steps', 'batch_size'), donate_argnums=(0, 1))
def _train_epoch(params, opt_state, x_nd, y_n, lrs_l, key, epoch, *, total_steps, batch_size):
  """One epoch of every head: a fresh permutation (fold_in(key, epoch)), remainder dropped. The
  cosine schedule reads the step count from opt_state, so epochs chain across calls."""
  steps_per_epoch = x_nd.shape[0] // batch_size

  def head_step(params, opt_state, lr, x_bd, y_b):
    grads = jax.grad(_loss)(params, x_bd, y_b)
    updates, opt_state = _make_tx(lr, total_steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  grid_step = jax.vmap(head_step, in_axes=(0, 0, 0, None, None))

  def step(carry, idx_b):
    params, opt_state = carry
    return grid_step(params, opt_state, lrs_l, x_nd[idx_b].astype(jnp.float32), y_n[idx_b]), None

  perm = jax.random.permutation(jax.random.fold_in(key, epoch), x_nd.shape[0])
  batches = perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
  return jax.lax.scan(step, (params, opt_state), batches)[0]


def _check_xy(x, y, num_classes: int, what: str):
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(
      f'{what}: features must be (N, D) and labels (N,), got {x.shape} and {y.shape}: '
      'flatten the features per image and pass one integer label per row.'
    )
  lo, hi = (int(y.min()), int(y.max())) if y.size else (0, 0)
  if not np.issubdtype(y.dtype, np.integer) or lo < 0 or hi >= num_classes:
    raise ValueError(
      f'{what}: labels must be integers in [0, {num_classes}), got dtype {y.dtype} and range '
      f'[{lo}, {hi}]: pass class indices (in the full class space, also when scoring with a '
      'class_subset).'
    )
  return x, y


def _epoch_fn(x_train):
  """x_train as a function of the epoch: (N, D) features, or a callable epoch -> (N, D) (the
  features of that epoch's augmented views)."""
  return x_train if callable(x_train) else (lambda epoch: x_train)


def train_variant_heads(
  x_train: Mapping,
  y_train,
  num_classes: int,
  scaled_lrs: Sequence[float],
  *,
  epochs: int = 10,
  batch_size: int = 1024,
  seed: int = 0,
) -> dict:
  """One grid of heads (one per scaled lr) per feature variant {name: x_train} (each (N, D_v)
  or a callable epoch -> (N, D_v)), trained epoch by epoch with every variant's epoch e run
  before any epoch e + 1 (a caller's per-epoch features are read once). Every variant gets the
  same init seed and batches. Returns {name: (w_ldc, b_lc)} as numpy."""
  fns = {name: _epoch_fn(x) for name, x in x_train.items()}
  y = None
  for name, fn in fns.items():
    _, y = _check_xy(fn(0), y_train, num_classes, f'train ({name})')
  n = len(y)
  if not 0 < batch_size <= n:
    raise ValueError(
      f'batch_size {batch_size} does not fit {n} training examples (batches drop the '
      f'remainder): pass batch_size between 1 and {n}.'
    )
  if epochs < 1:
    raise ValueError(f'epochs must be at least 1, got {epochs}.')
  total = int(epochs) * (n // batch_size)
  lrs = jnp.asarray(scaled_lrs, jnp.float32)
  # A key apart from the init's, so the batch order does not reuse the init's randomness.
  key = jax.random.fold_in(jax.random.key(seed), 1)
  y_dev = jnp.asarray(y, jnp.int32)
  state = {}
  for epoch in range(int(epochs)):
    for name, fn in fns.items():
      x = jnp.asarray(np.asarray(fn(epoch)))
      if name not in state:
        w, b = init_heads(len(scaled_lrs), x.shape[1], num_classes, seed)
        params = {'w': w, 'b': b}
        state[name] = (params, _init_opt(params, lrs, total_steps=total))
      state[name] = _train_epoch(
        *state[name], x, y_dev, lrs, key, epoch, total_steps=total, batch_size=int(batch_size)
      )
  return {name: (np.asarray(p['w']), np.asarray(p['b'])) for name, (p, _) in state.items()}


def train_heads(
  x_train,
  y_train,
  num_classes: int,
  scaled_lrs: Sequence[float],
  *,
  epochs: int = 10,
  batch_size: int = 1024,
  seed: int = 0,
):
  """Trains one head per (already scaled) learning rate together: (w_ldc, b_lc) as numpy.
  x_train: (N, D), or a callable epoch -> (N, D)."""
  kw = {'epochs': epochs, 'batch_size': batch_size, 'seed': seed}
  return train_variant_heads({'x': x_train}, y_train, num_classes, scaled_lrs, **kw)['x']


@jax.jit
def _predict_chunk(w_ldc, b_lc, x_nd, subset_s):
  logits = jnp.einsum('nd,ldc->lnc', x_nd.astype(jnp.float32), w_ldc) + b_lc[:, None]
  if subset_s is None:
    return jnp.argmax(logits, axis=-1)
  return subset_s[jnp.argmax(logits[..., subset_s], axis=-1)]


def _subset(class_subset, num_classes: int):
  if class_subset is None:
    return None
  s = np.asarray(class_subset)
  if (
    s.ndim != 1
    or not len(s)
    or len(np.unique(s)) != len(s)
    or not np.issubdtype(s.dtype, np.integer)
  ):
    raise ValueError(
      f'class_subset must be distinct integer class indices, got {class_subset!r}: pass e.g. the '
      "200 ImageNet indices of ImageNet-R's classes."
    )
  if s.min() < 0 or s.max() >= num_classes:
    raise ValueError(
      f"class_subset holds indices outside [0, {num_classes}): pass indices into the head's "
      'classes.'
    )
  return jnp.asarray(s, jnp.int32)


def predict(w_ldc, b_lc, x, class_subset=None) -> np.ndarray:
  """Predicted class of every row under every head: (L, N) indices in the full class space."""
  x = np.asarray(x)
  subset = _subset(class_subset, w_ldc.shape[-1])
  w, b = jnp.asarray(w_ldc), jnp.asarray(b_lc)
  out = []
  for start in range(0, len(x), _PREDICT_CHUNK):
    chunk = x[start : start + _PREDICT_CHUNK]
    # Pad the last chunk to the common size so that it reuses the compiled program.
    size = min(len(x), _PREDICT_CHUNK)
    padded = np.concatenate([chunk, np.zeros((size - len(chunk), x.shape[1]), x.dtype)])
    out.append(np.asarray(_predict_chunk(w, b, jnp.asarray(padded), subset))[:, : len(chunk)])
  return np.concatenate(out, axis=1) if out else np.zeros((len(w), 0), np.int32)


def _accuracies(w_ldc, b_lc, x, y, class_subset) -> np.ndarray:
  x, y = _check_xy(x, y, w_ldc.shape[-1], 'scoring')
  _subset(class_subset, w_ldc.shape[-1])  # A malformed subset is the error to report first.
  if class_subset is not None and not np.isin(y, class_subset).all():
    outside = np.unique(y[~np.isin(y, class_subset)])[:5]
    raise ValueError(
      f'labels {outside.tolist()} are not in class_subset, so no prediction could match them: '
      "pass the labels of the subset's dataset, in the full class space."
    )
  return (predict(w_ldc, b_lc, x, class_subset) == y[None]).mean(axis=1)


def score(head: Mapping, x, y, class_subset=None) -> float:
  """Top-1 accuracy in [0, 1] of one head {'w': (D, C), 'b': (C,)} on features x (N, D)."""
  w, b = np.asarray(head['w']), np.asarray(head['b'])
  return float(_accuracies(w[None], b[None], x, y, class_subset)[0])


def _select(w, b, x_val, y_val, lrs, batch_size: int, class_subset) -> dict:
  acc = _accuracies(w, b, x_val, y_val, class_subset)
  best = int(np.argmax(acc))  # First maximum: ties go to the smaller lr, as in DINOv2.
  return {
    'accuracy': float(acc[best]),
    'lr': lrs[best],
    'scaled_lr': scale_lr(lrs[best], batch_size),
    'val_accuracy_per_lr': dict(zip(lrs, acc.tolist())),
    'head': {'w': w[best], 'b': b[best]},
  }


def fit_and_score(
  x_train,
  y_train,
  x_val,
  y_val,
  num_classes: int,
  *,
  lrs=None,
  epochs: int = 10,
  batch_size: int = 1024,
  seed: int = 0,
  class_subset=None,
) -> dict:
  """Trains the grid on (x_train, y_train) and picks the head with the best validation top-1.

  x_train: (N, D), or a callable epoch -> (N, D) (augmented views, a new set per epoch).
  Returns 'accuracy' (the chosen head's validation top-1, in [0, 1]), 'lr' (its base learning
  rate, from `lrs`, default LEARNING_RATES), 'scaled_lr' (lr × batch_size / 256, what it trained
  with), 'val_accuracy_per_lr' ({base lr: accuracy}), 'head' ({'w': (D, C), 'b': (C,)}, for
  `score` on other test sets) and 'steps' (iterations run).
  """
  r = fit_and_score_variants(
    {'x': (x_train, x_val)}, y_train, y_val, num_classes, lrs=lrs, epochs=epochs,
    batch_size=batch_size, seed=seed, class_subset=class_subset,
  )  # fmt: skip
  return {**{k: r[k] for k in ('accuracy', 'lr', 'scaled_lr', 'head', 'steps')},
          'val_accuracy_per_lr': r['table']['x']}  # fmt: skip


def fit_and_score_variants(
  variants: Mapping[str, tuple],
  y_train,
  y_val,
  num_classes: int,
  *,
  lrs=None,
  epochs: int = 10,
  batch_size: int = 1024,
  seed: int = 0,
  class_subset=None,
) -> dict:
  """The grid over feature variants × learning rates: {name: (x_train, x_val)} → the best pair.

  x_train may be a callable epoch -> features (train_variant_heads). Each variant trains its own
  grid with the same seed, hence the same init and batches. Returns 'variant', 'accuracy', 'lr',
  'scaled_lr', 'head' of the best (variant, lr) — ties go to the earlier variant, then the
  smaller lr — 'table': {variant: {lr: validation accuracy}} and 'steps'.
  """
  if not variants:
    raise ValueError('variants is empty: pass {name: (x_train, x_val)} with at least one entry.')
  lrs = tuple(float(lr) for lr in (LEARNING_RATES if lrs is None else lrs))
  heads = train_variant_heads(
    {name: x_tr for name, (x_tr, _) in variants.items()}, y_train, num_classes,
    [scale_lr(lr, batch_size) for lr in lrs], epochs=epochs, batch_size=batch_size, seed=seed,
  )  # fmt: skip
  results = {
    name: _select(*heads[name], x_va, y_val, lrs, batch_size, class_subset)
    for name, (_, x_va) in variants.items()
  }
  best = max(results, key=lambda name: results[name]['accuracy'])  # First maximum wins.
  chosen = results[best]
  return {
    'variant': best,
    'accuracy': chosen['accuracy'],
    'lr': chosen['lr'],
    'scaled_lr': chosen['scaled_lr'],
    'head': chosen['head'],
    'table': {name: r['val_accuracy_per_lr'] for name, r in results.items()},
    'steps': int(epochs) * (len(np.asarray(y_train)) // batch_size),
  }
