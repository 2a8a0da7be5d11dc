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
    n, h, w, c = x.shape
    if self.mode == 'shuffle':
      y = conv(4 * self.features, 3, 'conv', self.dtype)(x)
      y = y.reshape(n, h, w, self.features, 2, 2).transpose(0, 1, 4, 2, 5, 3)
      return nn.gelu(y.reshape(n, 2 * h, 2 * w, self.features), approximate=False)
    check_upsample(self.mode)
    x = jax.image.resize(x, (n, 2 * h, 2 * w, c), 'bilinear')
    return nn.gelu(conv(self.features, 3, 'conv', self.dtype)(x), approximate=False)
