"""Layers shared by the models: every parameter gets logical axis names.

Vocabulary (mapped to mesh axes by triplane3d/sharding.py): 'embed' transformer / decoder
widths, 'mlp' MLP hidden, 'heads' and 'kv' attention heads and head_dim, 'channels' conv
output channels, 'conv_in' conv input channels, 'spatial' kernel spatial axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any  # A computation dtype (jnp.float32, jnp.bfloat16, ...).

# `partitioned(init, axes)`: an initializer whose parameter carries logical axis names.
partitioned = nn.with_logical_partitioning


def dense(features, in_axis, out_axes, name, dtype, axis=-1):
  """A DenseGeneral whose kernel and bias carry logical axis names."""
  out_axes = tuple(out_axes)
  in_axes = in_axis if isinstance(in_axis, tuple) else (in_axis,)
  return nn.DenseGeneral(
    features,
    axis=axis,
    dtype=dtype,
    kernel_init=partitioned(nn.initializers.lecun_normal(), (*in_axes, *out_axes)),
    bias_init=partitioned(nn.initializers.zeros, out_axes),
    name=name,
  )


def layer_norm(name, dtype):
  """LayerNorm (eps 1e-6) over an 'embed' axis."""
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    scale_init=partitioned(nn.initializers.ones, ('embed',)),
    bias_init=partitioned(nn.initializers.zeros, ('embed',)),
    name=name,
  )


def conv(features, kernel, name, dtype):
  """A square 'SAME' conv, (N, H, W, Cin) → (N, H, W, features)."""
  return nn.Conv(
    features,
    (kernel, kernel),
    padding='SAME',
    dtype=dtype,
    kernel_init=partitioned(
      nn.initializers.lecun_normal(), ('spatial', 'spatial', 'conv_in', 'channels')
    ),
    bias_init=partitioned(nn.initializers.zeros, ('channels',)),
    name=name,
  )


def _up2(x, axis):
  """×2 along `axis`: output 2i = 0.75·x[i] + 0.25·x[i − 1], 2i + 1 = 0.75·x[i] + 0.25·x[i + 1]
  (the border sample repeated past the edge)."""
  n = x.shape[axis]
  take = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)  # noqa: E731
  prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
  nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
  out = jnp.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
  return out.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1 :])


def _up2_transpose(g, axis):
  """The adjoint of `_up2`: (…, 2n, …) → (…, n, …). x[i] feeds outputs 2i, 2i + 1 (0.75 each),
  2i + 2 and 2i − 1 (0.25 each; at the borders, the clamped taps of outputs 0 and 2n − 1)."""
  n = g.shape[axis] // 2
  g = g.reshape(*g.shape[:axis], n, 2, *g.shape[axis + 1 :])
  even = jax.lax.index_in_dim(g, 0, axis + 1, keepdims=False)
  odd = jax.lax.index_in_dim(g, 1, axis + 1, keepdims=False)
  if n == 1:
    return even + odd
  take = lambda a, lo, hi: jax.lax.slice_in_dim(a, lo, hi, axis=axis)  # noqa: E731
  zero = jnp.zeros_like(take(even, 0, 1))
  from_next = jnp.concatenate([take(even, 0, 1) + take(even, 1, 2), take(even, 2, n), zero], axis)
  last = take(odd, n - 2, n - 1) + take(odd, n - 1, n)
  from_prev = jnp.concatenate([zero, take(odd, 0, n - 2), last], axis)
  return 0.75 * (even + odd) + 0.25 * (from_next + from_prev)


@jax.custom_vjp
def upsample2x_bilinear(x_nhwc: jax.Array) -> jax.Array:
  """Bilinear ×2 upsampling, (N, H, W, C) → (N, 2H, 2W, C): `jax.image.resize(x, ...,
  'bilinear')`, i.e. torch's `interpolate(scale_factor=2, mode='bilinear',
  align_corners=False)`, written as its fixed 2-tap stencil per axis, with its adjoint.

  Why not `jax.image.resize`: it applies a dense (2n, n) weight matrix per axis as a
  `dot_general`, whose transposes cost XLA:CPU a quarter of a second per ViT-S/14 CPU step
  (docs/performance.md, Optimisations); the stencil and its hand-written adjoint are
  elementwise and fuse (autodiff of the stencil's concatenates and stack does not fuse as
  well, so the backward pass is written out). `UpsampleBlock` uses it on CPU.
  """
  return _up2(_up2(x_nhwc, 1), 2)


def _upsample_fwd(x):
  return upsample2x_bilinear(x), None


def _upsample_bwd(_, g):
  return (_up2_transpose(_up2_transpose(g, 2), 1),)


upsample2x_bilinear.defvjp(_upsample_fwd, _upsample_bwd)


UPSAMPLE_MODES = ('bilinear', 'shuffle')


def check_upsample(mode: str) -> str:
  """`mode` if it is one of `UPSAMPLE_MODES`, else a ValueError naming the config field."""
  if mode not in UPSAMPLE_MODES:
    raise ValueError(f'decoder.upsample must be one of {UPSAMPLE_MODES}, got {mode!r}.')
  return mode


class UpsampleBlock(nn.Module):
  """A ×2 upsampling block, (N, H, W, Cin) → (N, 2H, 2W, features).

  mode 'bilinear' (the paper's decoder): bilinear ×2 → 3×3 conv → GELU.
  mode 'shuffle' (sub-pixel convolution, Shi et al. 2016): 3×3 conv at H×W to 4·features →
    depth-to-space ×2 (channel c·4 + 2i + j goes to sub-pixel (i, j) of feature c, the order of
    `torch.nn.functional.pixel_shuffle`) → GELU. The same FLOPs as 'bilinear', but every output
    pixel has its own weights (a bilinear input is smooth within a cell, so a 3×3 conv on it
    cannot give four neighbouring outputs independent values), the 3×3 window covers 6×6
    output pixels instead of 3×3, and the 4× larger interpolated input is never stored.
  """

  features: int
  dtype: Dtype = jnp.float32
  mode: str = 'bilinear'

  @nn.compact
  def __call__(self, x):
    n, h, w, _ = x.shape
    if self.mode == 'shuffle':
      y = conv(4 * self.features, 3, 'conv', self.dtype)(x)
      y = y.reshape(n, h, w, self.features, 2, 2).transpose(0, 1, 4, 2, 5, 3)
      return nn.gelu(y.reshape(n, 2 * h, 2 * w, self.features), approximate=False)
    check_upsample(self.mode)
    # The stencil on CPU only: on TPU the paper step's fit was measured with `jax.image.resize`
    # (docs/performance.md), and the v5e 128/chip fit has 0.01 GiB to spare.
    resize = lambda x: jax.image.resize(x, (n, 2 * h, 2 * w, x.shape[-1]), 'bilinear')  # noqa: E731
    x = jax.lax.platform_dependent(x, cpu=upsample2x_bilinear, default=resize)
    return nn.gelu(conv(self.features, 3, 'conv', self.dtype)(x), approximate=False)
