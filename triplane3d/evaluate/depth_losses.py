"""DINOv2's depth losses (dinov2/eval/depth/models/losses/{sigloss,gradientloss}.py) in jnp.

Shapes: pred_bhw, gt_bhw (B, H, W) depths in metres at the ground truth's resolution; a
ground-truth depth ≤ 0 marks a missing measurement (NYU's holes), left out of every sum.

SigLoss (scale-invariant log loss, AdaBins): over the valid pixels of the *whole batch* (the
original boolean-indexes the batch tensor), g = log(pred + ε) − log(gt + ε) with ε = 1e-3,

    sigloss = sqrt(Var(g) + λ·mean(g)²),  λ = 0.15,  Var unbiased (torch.var: N − 1).

With `warm_up` (DINOv2's NYU config sets warm_up=True; the original counts 100 calls) the
loss is sqrt(λ·mean(g)²) alone; written as sqrt(λ)·|mean(g)|, equal and with a finite gradient.

Gradient loss (MegaDepth's multi-scale gradient matching): per image, at the scales obtained by
keeping every 1st, 2nd, 4th and 6th row and column (the original's `x[::2i, ::2i]`, i = 1..3),
d = (log(pred + ε) − log(gt + ε)) on valid pixels (0 elsewhere), and

    Σ_scales ( Σ |d[y, x] − d[y, x + 2]| + Σ |d[y, x] − d[y + 2, x]| ) / N_valid(scale)

where a difference counts only if both of its pixels are valid (note the offset of 2 pixels, as
in the original). We apply it to each (H, W) image and average over the batch. DINOv2's code
indexes its (B, 1, H, W) tensors with these 2-D slices, so there they cut the batch and channel
axes instead: with the 2 images per GPU of DINOv2's NYU config every difference is empty and
the term is exactly 0 (docs/evaluation.md) — set the weight to 0 to reproduce that objective.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

EPS = 1e-3  # Both losses: "avoid grad explode".
SIG_LAMBDA = 0.15
GRADIENT_STEPS = (1, 2, 4, 6)  # Subsampling of the 4 scales.


def _log_diff(pred, gt, valid):
  """log(pred + ε) − log(gt + ε) on valid pixels, 0 elsewhere (no NaN from masked gt)."""
  safe_gt = jnp.where(valid, gt, 1.0)
  return jnp.where(valid, jnp.log(pred + EPS) - jnp.log(safe_gt + EPS), 0.0)


def sigloss(pred_bhw, gt_bhw, warm_up=False):
  """Scale-invariant log loss over the valid pixels of the batch (module docstring): scalar.

  `warm_up` may be a traced bool (the training step passes step < warm-up steps)."""
  valid = gt_bhw > 0
  n = jnp.sum(valid)
  g = _log_diff(pred_bhw, gt_bhw, valid)
  mean = jnp.sum(g) / n
  var = jnp.sum(jnp.where(valid, g - mean, 0.0) ** 2) / (n - 1)
  full = jnp.sqrt(var + SIG_LAMBDA * mean**2)
  return jnp.where(warm_up, math.sqrt(SIG_LAMBDA) * jnp.abs(mean), full)


def _gradient_loss_hw(pred_hw, gt_hw):
  total = 0.0
  for step in GRADIENT_STEPS:
    p, t = pred_hw[::step, ::step], gt_hw[::step, ::step]
    valid = t > 0
    m = valid.astype(p.dtype)
    d = _log_diff(p, t, valid)
    v = jnp.abs(d[:-2] - d[2:]) * m[:-2] * m[2:]
    h = jnp.abs(d[:, :-2] - d[:, 2:]) * m[:, :-2] * m[:, 2:]
    # An image without valid pixels adds 0 (the original divides 0 by 0).
    total = total + (jnp.sum(v) + jnp.sum(h)) / jnp.maximum(jnp.sum(m), 1.0)
  return total


def gradient_loss(pred_bhw, gt_bhw):
  """Multi-scale gradient matching loss of each image, averaged over the batch: scalar."""
  return jnp.mean(jax.vmap(_gradient_loss_hw)(pred_bhw, gt_bhw))
