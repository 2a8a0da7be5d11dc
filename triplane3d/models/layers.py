"""Layer constructors shared by the models: every parameter gets logical axis names.

Vocabulary (mapped to mesh axes by triplane3d/sharding.py): 'embed' transformer / decoder
widths, 'mlp' MLP hidden, 'heads' and 'kv' attention heads and head_dim, 'channels' conv
output channels, 'conv_in' conv input channels, 'spatial' kernel spatial axes.
"""

from __future__ import annotations

import flax.linen as nn

_part = nn.with_logical_partitioning


def dense(features, in_axis, out_axes, name, dtype, axis=-1):
  """A DenseGeneral whose kernel and bias carry logical axis names."""
  out_axes = tuple(out_axes)
  in_axes = in_axis if isinstance(in_axis, tuple) else (in_axis,)
  return nn.DenseGeneral(
    features,
    axis=axis,
    dtype=dtype,
    kernel_init=_part(nn.initializers.lecun_normal(), (*in_axes, *out_axes)),
    bias_init=_part(nn.initializers.zeros, out_axes),
    name=name,
  )


def layer_norm(name, dtype):
  """LayerNorm (eps 1e-6) over an 'embed' axis."""
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=dtype,
    scale_init=_part(nn.initializers.ones, ('embed',)),
    bias_init=_part(nn.initializers.zeros, ('embed',)),
    name=name,
  )


def conv(features, kernel, name, dtype):
  """A square 'SAME' conv, (N, H, W, Cin) → (N, H, W, features)."""
  return nn.Conv(
    features,
    (kernel, kernel),
    padding='SAME',
    dtype=dtype,
    kernel_init=_part(
      nn.initializers.lecun_normal(), ('spatial', 'spatial', 'conv_in', 'channels')
    ),
    bias_init=_part(nn.initializers.zeros, ('channels',)),
    name=name,
  )
