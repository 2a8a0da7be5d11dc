"""Layers shared by the models: every parameter gets logical axis names.

Vocabulary (mapped to mesh axes by triplane3d/sharding.py): 'embed' transformer / decoder
widths, 'mlp' MLP hidden, 'heads' and 'kv' attention heads and head_dim, 'channels' conv
output channels, 'conv_in' conv input channels, 'spatial' kernel spatial axes.
"""

from __future__ import annotations

import functools
import math
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


# XLA:CPU computes a convolution's kernel gradient over a large batch far below its matmul
# rate: for the ViT-S/14 decoder's last 3×3 conv (6 planes of 128² × 128 → 64) 208 ms, against
# 95 ms as a sum over one plane at a time; the same sum is no slower at the smaller layers
# (docs/performance.md, "CPU: JAX vs a straightforward PyTorch step"). So on CPU the kernel
# gradient is summed over slices of the batch of at most this many input bytes (at least one
# image, at most MAX_SLICES slices); elsewhere it is one convolution, as XLA derives it.
CPU_FILTER_GRAD_BYTES = 4 * 2**20
MAX_SLICES = 16


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
  """`jax.lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)` signature) whose
  kernel gradient on CPU is summed over slices of the batch (`CPU_FILTER_GRAD_BYTES`). The same
  values and gradients up to float summation order."""
  op = functools.partial(
    jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kwargs
  )
  if kwargs.get('batch_group_count', 1) != 1:  # The batch is then not summed over.
    return op(lhs, rhs)
  return _sliced_filter_grad(op, lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sliced_filter_grad(op, lhs, rhs):
  return op(lhs, rhs)


def _sliced_filter_grad_fwd(op, lhs, rhs):
  return op(lhs, rhs), (lhs, rhs)


def _sliced_filter_grad_bwd(op, residuals, g):
  lhs, rhs = residuals
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, op.keywords.get('dimension_numbers'))
  lhs_batch, out_batch = dn.lhs_spec[0], dn.out_spec[0]

  def whole(lhs, g):
    return jax.vjp(lambda w: op(lhs, w), rhs)[1](g)[0]

  def sliced(lhs, g):
    n = lhs.shape[lhs_batch]
    image_bytes = lhs.size // n * lhs.dtype.itemsize
    per = max(1, CPU_FILTER_GRAD_BYTES // image_bytes, math.ceil(n / MAX_SLICES))
    if per >= n:
      return whole(lhs, g)
    take = lambda x, i, axis: jax.lax.slice_in_dim(x, i, min(i + per, n), axis=axis)  # noqa: E731
    parts = [whole(take(lhs, i, lhs_batch), take(g, i, out_batch)) for i in range(0, n, per)]
    return functools.reduce(jnp.add, parts)

  dlhs = jax.vjp(lambda x: op(x, rhs), lhs)[1](g)[0]
  return dlhs, jax.lax.platform_dependent(lhs, g, cpu=sliced, default=whole)


_sliced_filter_grad.defvjp(_sliced_filter_grad_fwd, _sliced_filter_grad_bwd)


def conv(features, kernel, name, dtype):
  """A square 'SAME' conv, (N, H, W, Cin) → (N, H, W, features); its kernel gradient on CPU is
  summed over slices of the batch (`conv_general_dilated`)."""
  return nn.Conv(
    features,
    (kernel, kernel),
    padding='SAME',
    dtype=dtype,
    conv_general_dilated=conv_general_dilated,
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
