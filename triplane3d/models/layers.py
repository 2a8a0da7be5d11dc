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


class UpsampleBlock(nn.Module):
  """Bilinear ×2 → 3×3 conv → GELU. (N, H, W, Cin) → (N, 2H, 2W, features)."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    x = jax.image.resize(x, (n, 2 * h, 2 * w, c), 'bilinear')
    return nn.gelu(conv(self.features, 3, 'conv', self.dtype)(x), approximate=False)
