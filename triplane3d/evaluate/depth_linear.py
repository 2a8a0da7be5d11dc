"""DINOv2's linear depth probe ('lin. 4', `BNHead` with classify=True) on cached frozen features.

Inputs (features.py, `with_patches`): patches (N, P, K·D) — patch tokens of K = 4 blocks
(`features.depth_blocks`: [2, 5, 8, 11] for 12 blocks, [4, 11, 17, 23] for 24), WITHOUT the
final norm — and patch_cls (N, K·D), the class tokens of the same blocks; G² = P patches; the
ground truth meta_depth (N, H, W) in metres, 0 where missing.

The head (dinov2/eval/depth/models/decode_heads): per block, the class token is concatenated to
every patch token ([x_k, cls_k], the 2·K·D channels in that order), the map is upsampled
bilinearly ×4 (G → 4G, align_corners=False), a 1×1 convolution maps each pixel to `n_bins` = 256
logits, `norm_strategy='linear'` turns them into weights (ReLU, + 0.1, divided by their sum)
and depth = Σ weights · bins, bins = linspace(min_depth, max_depth, n_bins) = [0.001, 10] m.
Bilinear upsampling is linear per channel with weights summing to 1, so it commutes with the 1×1
convolution (bias included): we apply the convolution at G×G and upsample its 256 logits, the
same numbers for a fraction of the work. Predictions are clamped to [min_depth, max_depth] and
resized bilinearly to the ground truth's size, where the losses are computed
(depth_losses.py): SigLoss + `grad_loss_weight` × gradient loss.

Training (DINOv2's NYU linear config): AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.01 on
every head parameter, gradient clipping at global norm 35, 38,400 iterations; learning rate:
cosine annealing from lr to lr·1e-8 over the run, times a linear warm-up over the first 12,800
iterations from 0.001 (mmcv `CosineAnnealing`, warmup='linear'); β1 one-cycle 0.95 → 0.85 over
the first 30 % of the run, then back to 0.95 (mmcv `OneCycle` momentum); SigLoss warm-up for
the first 100 iterations. DINOv2 draws 2 images per GPU (GPU count not stated in the config);
we default to 16 per batch. Initialisation as PyTorch's Conv2d: U(±1/sqrt(fan_in)).

Evaluation (the Monocular-Depth-Estimation-Toolbox that DINOv2 uses): per image, over pixels
with min_depth < gt < max_depth, RMSE, abs-rel and δ1 (max(gt/pred, pred/gt) < 1.25), then the
mean over images; optionally averaged with the prediction on the horizontally flipped image
(DINOv2's test-time flip). Baseline: the training set's mean valid depth everywhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from triplane3d.evaluate import depth_losses

VERSION = 1  # Part of every cached probe result's key: bump when the probe changes.
_CHUNK = 50  # Training steps per compiled scan call.
_PREDICT_BATCH = 32
NUM_BLOCKS = 4  # features.depth_blocks: always 4 blocks.


@dataclasses.dataclass(frozen=True)
class Settings:
  """The probe's numbers (module docstring); `from_config(config.nyu_depth)`."""

  steps: int = 38400
  batch_size: int = 16
  lr: float = 1e-4
  weight_decay: float = 0.01
  warmup_steps: int = 12800
  grad_clip: float = 35.0
  grad_loss_weight: float = 0.5
  sigloss_warmup_steps: int = 100
  n_bins: int = 256
  min_depth: float = 1e-3
  max_depth: float = 10.0
  upsample: int = 4
  seed: int = 0

  @classmethod
  def from_config(cls, c) -> Settings:
    s = cls(**{f.name: type(f.default)(c[f.name]) for f in dataclasses.fields(cls) if f.name in c})
    if not 0 <= s.warmup_steps < s.steps or s.batch_size < 1:
      raise ValueError(
        f'nyu_depth: warmup_steps must lie in [0, steps) and batch_size be positive, got '
        f'steps={s.steps}, warmup_steps={s.warmup_steps}, batch_size={s.batch_size}: DINOv2 '
        'uses 38400 and 12800 (a third); set both when shortening the run.'
      )
    return s

  def bins(self) -> jnp.ndarray:
    return jnp.linspace(self.min_depth, self.max_depth, self.n_bins, dtype=jnp.float32)


def _anneal_cos(start, end, frac):
  return end + (start - end) / 2 * (jnp.cos(jnp.pi * frac) + 1)


def lr_schedule(s: Settings):
  """mmcv CosineAnnealing (min_lr_ratio 1e-8) × linear warm-up (ratio 0.001) of step t."""

  def lr(t):
    t = jnp.asarray(t, jnp.float32)
    regular = _anneal_cos(s.lr, s.lr * 1e-8, t / s.steps)
    k = (1 - t / max(s.warmup_steps, 1)) * (1 - 1e-3)
    return jnp.where(t < s.warmup_steps, regular * (1 - k), regular)

  return lr


def beta1_schedule(s: Settings):
  """mmcv OneCycle momentum (pct_start 0.3): β1 0.95 → 0.85 → 0.95, cosine, of step t."""
  end1 = 0.3 * s.steps - 1

  def b1(t):
    t = jnp.asarray(t, jnp.float32)
    up = _anneal_cos(0.95, 0.85, t / end1)
    down = _anneal_cos(0.85, 0.95, (t - end1) / (s.steps - 1 - end1))
    return jnp.where(t <= end1, up, down)

  return b1


def optimizer(s: Settings) -> optax.GradientTransformation:
  adamw = optax.inject_hyperparams(optax.adamw)(
    learning_rate=lr_schedule(s), b1=beta1_schedule(s), b2=0.999, eps=1e-8,
    weight_decay=s.weight_decay,
  )  # fmt: skip
  return optax.chain(optax.clip_by_global_norm(s.grad_clip), adamw)


def init_head(in_channels: int, s: Settings) -> dict:
  """{'w': (2·K·D, n_bins) rows in DINOv2's channel order, 'b': (n_bins,)}."""
  bound = 1.0 / math.sqrt(in_channels)
  kw, kb = jax.random.split(jax.random.key(s.seed))
  return {
    'w': jax.random.uniform(kw, (in_channels, s.n_bins), jnp.float32, -bound, bound),
    'b': jax.random.uniform(kb, (s.n_bins,), jnp.float32, -bound, bound),
  }


def logits(head: dict, patches_bpf, cls_bf, num_blocks: int = NUM_BLOCKS) -> jnp.ndarray:
  """The 1×1 convolution on [x_k, cls_k] of each block k, without building that (B, P, 2·K·D)
  concatenation: (B, G, G, n_bins) logits at the patch grid."""
  b, p, f = patches_bpf.shape
  w = head['w'].reshape(num_blocks, 2, f // num_blocks, -1)  # (K, patch | cls, D, bins).
  w_patch, w_cls = w[:, 0].reshape(f, -1), w[:, 1].reshape(f, -1)
  out = patches_bpf.astype(jnp.float32) @ w_patch
  out = out + (cls_bf.astype(jnp.float32) @ w_cls)[:, None] + head['b']
  g = math.isqrt(p)
  return out.reshape(b, g, g, -1)


def depth_map(head: dict, patches_bpf, cls_bf, s: Settings) -> jnp.ndarray:
  """Expected depth (B, u·G, u·G) in [min_depth, max_depth]: logits upsampled ×u, 'linear'
  normalisation, weighted sum of the bins."""
  z = logits(head, patches_bpf, cls_bf)
  b, g, _, n = z.shape
  # jax.image.resize 'linear' upsampling = PyTorch bilinear with align_corners=False (half-pixel
  # centres; taps outside the image dropped and the rest renormalised = PyTorch's clamping).
  z = jax.image.resize(z, (b, s.upsample * g, s.upsample * g, n), 'linear', antialias=False)
  weights = jax.nn.relu(z) + 0.1
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights @ s.bins()


def _to_target(depth_bhw, hw) -> jnp.ndarray:
  # PyTorch's F.interpolate does not antialias when it downsamples (4G > H): neither do we.
  return jax.image.resize(depth_bhw, (depth_bhw.shape[0], *hw), 'linear', antialias=False)


def loss(head, patches_bpf, cls_bf, gt_bhw, step, s: Settings):
  """SigLoss (+ warm-up) + grad_loss_weight × gradient loss at the ground truth's size."""
  pred = _to_target(depth_map(head, patches_bpf, cls_bf, s), gt_bhw.shape[1:])
  sig = depth_losses.sigloss(pred, gt_bhw, warm_up=step < s.sigloss_warmup_steps)
  return sig + s.grad_loss_weight * depth_losses.gradient_loss(pred, gt_bhw)


def _train_chunk(s: Settings, tx):
  @jax.jit
  def run(head, opt_state, data, idx_sb, t_s):
    def step(carry, xs):
      head, opt_state = carry
      idx_b, t = xs
      patches, cls, gt = (a[idx_b] for a in data)
      value, grads = jax.value_and_grad(loss)(head, patches, cls, gt, t, s)
      updates, opt_state = tx.update(grads, opt_state, head)
      return (optax.apply_updates(head, updates), opt_state), value

    (head, opt_state), losses = jax.lax.scan(step, (head, opt_state), (idx_sb, t_s))
    return head, opt_state, losses

  return run


def _batches(n: int, s: Settings) -> np.ndarray:
  """(steps, batch) indices: a fresh permutation per epoch, the last partial batch dropped."""
  if s.batch_size > n:
    raise ValueError(
      f'nyu_depth.batch_size {s.batch_size} exceeds the {n} training images: lower it or raise '
      'nyu_depth.num_train.'
    )
  rng, per_epoch, out = np.random.default_rng(s.seed), n // s.batch_size, []
  while len(out) * per_epoch < s.steps:
    out.append(rng.permutation(n)[: per_epoch * s.batch_size].reshape(per_epoch, -1))
  return np.concatenate(out)[: s.steps]


def fit(train: dict, s: Settings) -> tuple[dict, np.ndarray]:
  """Trains the head on a set's features; returns (head, per-step training loss (steps,))."""
  data = (
    jnp.asarray(train['patches']),
    jnp.asarray(train['patch_cls'], jnp.float32),
    jnp.asarray(train['meta_depth'], jnp.float32),
  )
  head = init_head(2 * data[0].shape[-1], s)
  tx = optimizer(s)
  opt_state, run = tx.init(head), _train_chunk(s, tx)
  idx = _batches(len(data[0]), s)
  losses = []
  for start in range(0, s.steps, _CHUNK):
    t = np.arange(start, min(s.steps, start + _CHUNK))
    head, opt_state, value = run(head, opt_state, data, jnp.asarray(idx[t]), jnp.asarray(t))
    losses.append(np.asarray(value))
  return jax.device_get(head), np.concatenate(losses)


def predict(head: dict, feats: dict, s: Settings, flipped: dict | None = None) -> np.ndarray:
  """Depth maps (N, H, W) at the ground truth's size, clamped to [min_depth, max_depth]; with
  `flipped` (features of the mirrored images), averaged with its prediction mirrored back."""
  hw = feats['meta_depth'].shape[1:]

  @jax.jit
  def fn(patches, cls):
    d = jnp.clip(depth_map(head, patches, cls, s), s.min_depth, s.max_depth)
    return _to_target(d, hw)

  def run(f):
    n = len(f['patches'])
    return np.concatenate(
      [
        np.asarray(fn(f['patches'][i : i + _PREDICT_BATCH], f['patch_cls'][i : i + _PREDICT_BATCH]))
        for i in range(0, n, _PREDICT_BATCH)
      ]
    )

  pred = run(feats)
  if flipped is not None:
    pred = (pred + run(flipped)[:, :, ::-1]) / 2
  return pred


def metrics(pred_nhw, gt_nhw, s: Settings) -> dict[str, float]:
  """RMSE, abs-rel, δ1 per image over min_depth < gt < max_depth, averaged over images (images
  without a valid pixel are skipped)."""
  per_image = {'rmse': [], 'abs_rel': [], 'delta1': []}
  for pred, gt in zip(np.asarray(pred_nhw, np.float64), np.asarray(gt_nhw, np.float64)):
    valid = (gt > s.min_depth) & (gt < s.max_depth)
    if not valid.any():
      continue
    p, g = pred[valid], gt[valid]
    per_image['rmse'].append(np.sqrt(np.mean((g - p) ** 2)))
    per_image['abs_rel'].append(np.mean(np.abs(g - p) / g))
    per_image['delta1'].append(np.mean(np.maximum(g / p, p / g) < 1.25))
  return {k: float(np.mean(v)) if v else float('nan') for k, v in per_image.items()}


def evaluate(train: dict, test: dict, s: Settings, test_flipped: dict | None = None) -> dict:
  """Fit on train, report on test: metrics, the mean-depth baseline, the loss curve, protocol."""
  head, losses = fit(train, s)
  pred = predict(head, test, s, test_flipped)
  gt_train = np.asarray(train['meta_depth'], np.float64)
  valid = (gt_train > s.min_depth) & (gt_train < s.max_depth)
  mean_depth = float(gt_train[valid].mean())
  gt_test = test['meta_depth']
  every = max(1, len(losses) // 50)  # A readable curve: about 50 points.
  return {
    **metrics(pred, gt_test, s),
    'baselines': {
      'mean_depth': {'value': mean_depth, **metrics(np.full(gt_test.shape, mean_depth), gt_test, s)}
    },
    'loss_curve': {'every': every, 'loss': [float(x) for x in losses[::every]]},
    'final_loss': float(losses[-50:].mean()),
    'protocol': {
      'version': VERSION,
      'probe': "DINOv2 linear depth head (BNHead, classify, 'linear' bins normalisation)",
      'inputs': 'patch tokens of 4 blocks without the final norm, class token concatenated',
      'settings': dataclasses.asdict(s),
      'target_hw': list(gt_test.shape[1:]),
      'test_flip': test_flipped is not None,
      'num_train': len(train['patches']),
      'num_test': len(test['patches']),
    },
  }
