"""The triplane decoder Φ and the point MLP (SPEC.md §1 step 2, §3).

`TriplaneDecoder`: learnable (3 · L²) plane embeddings of width D_dec cross-attend to the
backbone representation h (B, 1 + N, 4·D); the resulting low-resolution planes are upsampled
(bilinear ×2 → 3×3 conv → GELU per block, the same weights for each of the three planes)
and projected to C channels: (B, 3, L·2^U, L·2^U, C), 128×128×32 by default.

`PointMLP` / `point_mlp`: the EG3D decoder from averaged plane features to colour and raw
density. The module only declares parameters; `point_mlp(params, feats)` is the pure
function it applies, and exactly what the renderer takes as `decode_fn` with
`variables['params']` (unboxed) as `mlp_params`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_part = nn.with_logical_partitioning


def point_mlp(params: Any, feats_nc: jnp.ndarray, dtype: Dtype = jnp.float32):
  """The point decoder as a pure function (EG3D's OSGDecoder).

  Args:
    params: {'hidden': {'kernel' (C, F), 'bias' (F,)}, 'out': {'kernel' (F, 4), 'bias' (4,)}}.
    feats_nc: (n, C) plane features (mean of the three planes).
    dtype: computation dtype of the two matmuls.

  Returns:
    `(rgb (n, 3), raw_sigma (n, 1))`, float32. rgb = sigmoid(x)·(1 + 2·0.001) − 0.001; the raw
    density is activated later, in the marcher.
  """
  hid, out = params['hidden'], params['out']
  x = jnp.dot(feats_nc.astype(dtype), hid['kernel'].astype(dtype)) + hid['bias'].astype(dtype)
  x = jax.nn.softplus(x)
  x = jnp.dot(x, out['kernel'].astype(dtype)) + out['bias'].astype(dtype)
  x = x.astype(jnp.float32)
  rgb = jax.nn.sigmoid(x[:, 1:]) * (1 + 2 * 0.001) - 0.001
  return rgb, x[:, :1]


class _LinearParams(nn.Module):
  """Declares a (in, out) kernel and (out,) bias with logical axes; computes nothing."""

  features: int
  axes: tuple[str | None, str | None]

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param(
      'kernel', _part(nn.initializers.lecun_normal(), self.axes), (in_features, self.features)
    )
    bias = self.param('bias', _part(nn.initializers.zeros, self.axes[1:]), (self.features,))
    return {'kernel': kernel, 'bias': bias}


class PointMLP(nn.Module):
  """C → hidden → softplus → 1 + 3. Input (n, C); returns `point_mlp`'s (rgb, raw_sigma).

  Its `params` collection is exactly the pytree `point_mlp` takes.
  """

  hidden: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats_nc):
    params = {
      'hidden': _LinearParams(self.hidden, ('channels', 'mlp'), name='hidden')(feats_nc.shape[-1]),
      'out': _LinearParams(4, ('mlp', None), name='out')(self.hidden),
    }
    return point_mlp(params, feats_nc, self.dtype)
