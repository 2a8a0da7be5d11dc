"""The 3D-Prior objective as pure functions (no Flax).

  L = w_rgb·L_rgb + w_depth·L_depth + w_dist·L_dist + w_norm·L_norm

with the paper's weights (0.1, 1, 1, 1e-3) from `config.loss`. Inputs are per rendered ray so
that a random subset of rays (`render.rays_per_image`) and full renders share one code path:
targets are gathered at the rendered rays' pixel indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc

from triplane3d import render


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every element (float32)."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


def depth_error(pred: jax.Array, target: jax.Array, kind: str = 'l2') -> jax.Array:
  """L_depth: 'l2' (the paper's mean squared error) or 'l1' (mean absolute error).

  Where the image leaves the depth of a pixel uncertain (an object's edge: surface or
  background), squared error is lowest at the mean of the two depths — a value neither has —
  and absolute error at the likelier one, which also minimises the mean |error| we report.
  """
  if kind == 'l2':
    return mse(pred, target)
  if kind == 'l1':
    return jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))
  raise ValueError(f"loss.depth_loss must be 'l2' or 'l1', got {kind!r}.")


def density_l1(densities_bnk: jax.Array, reduction: str = 'mean') -> jax.Array:
  """L_norm: L1 of the (non-negative, activated) densities of every queried point.

  'mean': mean over all points (independent of rays and samples per image: the default).
  'sum': the paper's sum over an image's points, averaged over the batch.
  """
  d = jnp.abs(densities_bnk.astype(jnp.float32))
  if reduction == 'mean':
    return jnp.mean(d)
  if reduction == 'sum':
    return jnp.mean(jnp.sum(d.reshape(d.shape[0], -1), axis=-1))
  raise ValueError(f"loss.norm_reduction must be 'mean' or 'sum', got {reduction!r}.")


def psnr(mse_value: jax.Array, peak: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB of images in [0, peak] with the given MSE."""
  return 10.0 * jnp.log10(peak**2 / jnp.maximum(mse_value, 1e-10))


def combine_terms(terms_k: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The `objective` terms of a batch from those of its k equal-sized parts.

  Args:
    terms_k: `objective`'s terms of each part, every leaf stacked to (k,).

  Returns:
    The terms `objective` gives on the whole batch (up to float rounding): the mean of each
    term over the parts, except 'psnr', a function of the colour MSE over the whole batch,
    which is the PSNR of the parts' mean MSE.
  """
  terms = {name: jnp.mean(v, axis=0) for name, v in terms_k.items()}
  if 'psnr' in terms_k:
    mse_k = 10.0 ** (-terms_k['psnr'] / 10.0)  # Inverts `psnr` (peak 1).
    terms['psnr'] = psnr(jnp.mean(mse_k))
  return terms


def objective(
  recon: dict,
  batch: dict,
  h_student: jax.Array,
  h_teacher: jax.Array | None,
  loss_cfg: mlc.ConfigDict,
) -> tuple[jax.Array, dict]:
  """Total loss and every term.

  Args:
    recon: `Prior3D.reconstruct` output: 'rgb' (B, n, 3), 'depth' (B, n, 1), 'ray_indices'
      (B, n), and 'densities' (B, n, k) with the triplane decoder.
    batch: 'rgb' (B, R, R, 3) in [0, 1] and 'depth' (B, R, R, 1) targets.
    h_student, h_teacher: (B, T, E) representations; `h_teacher` None without distillation.
    loss_cfg: `config.loss`.

  Returns:
    `(total, terms)`: terms has 'rgb', 'depth', 'dist', 'norm' (0 where absent), 'total',
    and the diagnostics 'psnr' and 'depth_abs' (mean |depth error|) that take no weight.
    Every term but 'psnr' is a mean over images of a per-image mean (each image renders the
    same number of rays and samples), so a batch's terms and gradient are the means of its
    equal parts' (`combine_terms`: gradient accumulation).
  """
  # Targets (B, R, R, C) at the rendered rays' row-major pixel indices (B, n) → (B, n, C).
  gather = jax.vmap(render.gather_pixels)
  rgb_t = gather(batch['rgb'], recon['ray_indices'])
  depth_t = gather(batch['depth'], recon['ray_indices'])
  zero = jnp.zeros((), jnp.float32)
  terms = {
    'rgb': mse(recon['rgb'], rgb_t),
    'depth': depth_error(recon['depth'], depth_t, loss_cfg.depth_loss),
    'dist': zero if h_teacher is None else mse(h_student, jax.lax.stop_gradient(h_teacher)),
    'norm': (
      density_l1(recon['densities'], loss_cfg.norm_reduction) if 'densities' in recon else zero
    ),
  }
  total = (
    loss_cfg.rgb_weight * terms['rgb']
    + loss_cfg.depth_weight * terms['depth']
    + loss_cfg.dist_weight * terms['dist']
    + loss_cfg.norm_weight * terms['norm']
  )
  diag = {
    'total': total,
    'psnr': psnr(mse(jnp.clip(recon['rgb'], 0, 1), rgb_t)),
    'depth_abs': jnp.mean(jnp.abs(recon['depth'] - depth_t)),
  }
  return total, {**terms, **diag}
