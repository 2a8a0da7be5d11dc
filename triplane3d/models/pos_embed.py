"""Positional-embedding resizing that reproduces DINOv2's PyTorch behaviour exactly.

DINOv2 keeps a 37×37 grid of positional embeddings (released models are built at 518 px) and
resizes it in every forward pass to the input's patch grid. Two behaviours exist (docs/method.md):

* Non-register models call `F.interpolate(mode='bicubic', scale_factor=((h + 0.1) / 37, ...))`:
  Keys cubic kernel with A = -0.75, output→input mapping `src = (dst + 0.5) / scale - 0.5`
  driven by the *scale factor* (not the size ratio), taps clamped at the border, no antialias.
  `jax.image.resize` differs in both the kernel (A = -0.5) and the mapping (error ~1.2), so we
  build the separable interpolation matrices ourselves in float64 and apply them as constants:
  the result is linear in the table, hence differentiable, and matches PyTorch to ~1e-6.
* Register models call it by size with `antialias=True`, which in PyTorch uses the A = -0.5
  kernel with the size-based mapping: exactly `jax.image.resize(..., 'cubic', antialias=True)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 from floor(src)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale: float, a: float = -0.75) -> np.ndarray:
  """The (out_size, in_size) float64 matrix of PyTorch's scale-factor bicubic resize.

  Args:
    in_size: input length along the axis.
    out_size: output length.
    scale: the scale factor PyTorch was called with (`src = (dst + 0.5) / scale - 0.5`).
    a: the cubic kernel's A (-0.75 in PyTorch's non-antialiased bicubic).
  """
  # PyTorch computes the source positions and tap weights in float32 from a float32 inverse
  # scale; doing the same keeps us within float32 rounding of its output (float64 here would
  # be "more exact" but ~1e-5 away from the reference).
  f32 = np.float32
  inv = f32(1.0 / scale)
  src = inv * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
  base = np.floor(src)
  w = _cubic_weights(src - base, f32(a)).astype(np.float64)  # (out, 4)
  mat = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for k in range(4):  # Border taps are clamped, so several may land on the same input index.
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(mat, (rows, idx), w[:, k])
  mat.setflags(write=False)
  return mat


def resize_pos_grid(
  grid_hwd: jax.Array, out_h: int, out_w: int, *, offset: float, antialias: bool
) -> jax.Array:
  """Resizes a (M, M, D) positional grid to (out_h, out_w, D) the way DINOv2 does.

  Args:
    grid_hwd: the stored grid (M, M, D), any float dtype; computed in float32.
    out_h, out_w: the input's patch-grid height and width.
    offset: DINOv2's `interpolate_offset` (0.1 for the original models, 0.0 for register
      models). With `antialias=False` the scale factor is `(out + offset) / M`.
    antialias: True for register models (size-based, antialiased bicubic).

  Returns:
    (out_h, out_w, D) float32.
  """
  m_h, m_w, _ = grid_hwd.shape
  grid = grid_hwd.astype(jnp.float32)
  if antialias:
    return jax.image.resize(grid, (out_h, out_w, grid.shape[-1]), 'cubic', antialias=True)
  mh = jnp.asarray(bicubic_matrix(m_h, out_h, (out_h + offset) / m_h), jnp.float32)
  mw = jnp.asarray(bicubic_matrix(m_w, out_w, (out_w + offset) / m_w), jnp.float32)
  hp = jax.lax.Precision.HIGHEST  # The table is small; exactness is worth more than speed.
  return jnp.einsum('ai,bj,ijd->abd', mh, mw, grid, precision=hp)
