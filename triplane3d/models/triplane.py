"""The triplane decoder Φ and the point MLP (docs/method.md, "The decoders").

`TriplaneDecoder`: learnable (3 · L²) plane embeddings of width D_dec cross-attend to the
backbone representation h (B, 1 + N, 4·D); the resulting low-resolution planes are upsampled
(bilinear ×2 → 3×3 conv → GELU per block, or a sub-pixel convolution with
`decoder.upsample='shuffle'`; the same weights for each of the three planes)
and projected to C channels: (B, 3, L·2^U, L·2^U, C), 128×128×32 by default.

`PointMLP` / `point_mlp`: the EG3D decoder from averaged plane features to colour and raw
density, in float32. The module only declares parameters; `point_mlp(params, feats)` is the
pure function it applies, and exactly what the renderer takes as `decode_fn` with
`variables['params']` (unboxed) as `mlp_params`:

  mlp = PointMLP.from_config(config.render)
  mlp_params = nn.unbox(mlp.init(rng, jnp.zeros((1, C))))['params']
  out = render_image(planes, mlp_params, key, decode_fn=point_mlp, options=options)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from triplane3d.models.attention_prior import camera_attention_bias
from triplane3d.models.layers import (
  Dtype,
  UpsampleBlock,
  check_upsample,
  conv,
  dense,
  layer_norm,
  partitioned,
)
from triplane3d.render import marching
from triplane3d.render.camera import Camera
from triplane3d.render.fused import point_outputs


def point_mlp(params: Any, feats_nc: jax.Array, dtype: Dtype = jnp.float32):
  """The point decoder as a pure function (EG3D's OSGDecoder).

  Args:
    params: {'hidden': {'kernel' (C, F), 'bias' (F,)}, 'out': {'kernel' (F, 4), 'bias' (4,)}}.
    feats_nc: (n, C) plane features (mean of the three planes).
    dtype: computation dtype of the two matmuls' inputs and of the hidden activations.

  Returns:
    `(rgb (n, 3), raw_sigma (n, 1))`, float32 (float64 under a float64 `dtype`). rgb = sigmoid(x)·(1 + 2·0.001) − 0.001; the raw
    density is activated later, in the marcher.
  """
  hid, out = params['hidden'], params['out']
  x = jnp.dot(feats_nc.astype(dtype), hid['kernel'].astype(dtype)) + hid['bias'].astype(dtype)
  x = marching.softplus(x)
  # The 4 outputs (the raw density feeds exp()) accumulate and add their bias in float32
  # (float64 under float64) whatever `dtype`.
  wide = jnp.promote_types(dtype, jnp.float32)
  x = jnp.dot(x, out['kernel'].astype(dtype), preferred_element_type=wide)
  return point_outputs(x + out['bias'].astype(wide))


class _LinearParams(nn.Module):
  """Declares a (in, out) kernel and (out,) bias with logical axes; computes nothing."""

  features: int
  axes: tuple[str | None, str | None]

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param(
      'kernel', partitioned(nn.initializers.lecun_normal(), self.axes), (in_features, self.features)
    )
    bias = self.param('bias', partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,))
    return {'kernel': kernel, 'bias': bias}


class PointMLP(nn.Module):
  """C → hidden → softplus → 1 + 3. Input (n, C); returns `point_mlp`'s (rgb, raw_sigma).

  Its `params` collection is exactly the pytree `point_mlp` takes. It computes in `dtype`
  (render.mlp_dtype, whatever `decoder.dtype`: bfloat16 in the paper configs, float32 in the
  demo and EG3D); its outputs are float32 either way (densities feed exp() in the marcher).
  """

  hidden: int = 64
  dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, render_cfg: mlc.ConfigDict) -> PointMLP:
    """From the `render` config section (render.mlp_hidden, render.mlp_dtype)."""
    dtype = jnp.dtype(render_cfg.get('mlp_dtype', 'float32'))
    return cls(hidden=int(render_cfg.mlp_hidden), dtype=dtype)

  @nn.compact
  def __call__(self, feats_nc):
    params = {
      'hidden': _LinearParams(self.hidden, ('channels', 'mlp'), name='hidden')(feats_nc.shape[-1]),
      'out': _LinearParams(4, ('mlp', None), name='out')(self.hidden),
    }
    return point_mlp(params, feats_nc, self.dtype)


class CrossAttentionBlock(nn.Module):
  """Pre-norm block: x += MHA(LN(x), LN(h)); x += MLP(LN(x)). x (B, Q, D), h (B, N, E)."""

  num_heads: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, h, bias=None):
    """`bias`: optional additive attention-logit bias, (Q, N) shared by heads and batch, or
    (num_heads, Q, N) per head."""
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'decoder.width={d} is not divisible by decoder.num_heads={self.num_heads}.')
    head = (self.num_heads, d // self.num_heads)
    q_in = layer_norm('norm_q', self.dtype)(x)
    kv_in = layer_norm('norm_kv', self.dtype)(h)
    q = dense(head, 'embed', ('heads', 'kv'), 'query', self.dtype)(q_in)
    k = dense(head, 'embed', ('heads', 'kv'), 'key', self.dtype)(kv_in)
    v = dense(head, 'embed', ('heads', 'kv'), 'value', self.dtype)(kv_in)
    attn = nn.dot_product_attention(q, k, v, bias=bias, dtype=self.dtype)
    x = x + dense(d, ('heads', 'kv'), ('embed',), 'out', self.dtype, axis=(-2, -1))(attn)
    y = layer_norm('norm_mlp', self.dtype)(x)
    y = dense(self.mlp_ratio * d, 'embed', ('mlp',), 'fc1', self.dtype)(y)
    y = nn.gelu(y, approximate=False)
    return x + dense(d, 'mlp', ('embed',), 'fc2', self.dtype)(y)


def _upsample_to_planes(mdl: TriplaneDecoder, x):
  """(3B, L, L, D_dec) → (3B, R, R, C): the upsampling blocks and the 1×1 projection.

  A function of the module (not a submodule), so `nn.remat` can wrap it while the parameters
  keep their names (`up{i}`, `to_planes`) directly under the decoder.
  """
  for i, ch in enumerate(mdl.up_channels):
    x = UpsampleBlock(ch, mdl.dtype, mdl.upsample, name=f'up{i}')(x)
  return conv(mdl.plane_channels, 1, 'to_planes', mdl.dtype)(x)


class TriplaneDecoder(nn.Module):
  """h (B, 1 + N, E) → triplanes (B, 3, L·2^U, L·2^U, C), float32.

  Attributes:
    width: D_dec, the width of the (3·L², D_dec) learnable plane embeddings.
    num_heads, num_layers: the cross-attention blocks (queries: embeddings; keys/values: h).
    low_res: L, the embeddings' (and low-resolution planes') side.
    up_channels: one upsampling block per entry (U of them); the three planes share weights.
    upsample: the blocks' kind, 'bilinear' (the paper) or 'shuffle' (`layers.UpsampleBlock`).
    plane_channels: C, the final 1×1 projection (no activation: features may be negative).
    dtype: computation dtype (parameters stay float32).
    prior_camera: with a camera, the cross-attention starts local: a plane cell attends to the
      patches it projects to (`attention_prior.camera_attention_bias`); None: the paper's
      decoder.
    prior_sigma: the prior's width in patches.
    prior_heads: how many heads carry the prior (the first ones; None: all). The others start
      unbiased: at initialisation they see the average of h — the whole image, e.g. its
      background — beside the local patch the prior gives, so a cell can compare the two.
    plane_axes, plane_space: the renderer's plane order ('xyz' / 'eg3d') and space ('box' /
      'frustum'), for the prior.
    remat: rematerialise the upsampling blocks and the plane projection in the backward pass
      (`nn.remat`): only their (3B, L, L, D_dec) input is kept, the rest is recomputed. The
      same numbers and the same parameter tree (docs/performance.md, "Optimisations").
  """

  width: int = 512
  num_heads: int = 8
  num_layers: int = 1
  low_res: int = 16
  up_channels: Sequence[int] = (256, 128, 64)
  upsample: str = 'bilinear'
  plane_channels: int = 32
  dtype: Dtype = jnp.float32
  prior_camera: Camera | None = None
  prior_sigma: float = 1.0
  prior_heads: int | None = None
  plane_axes: str = 'xyz'
  plane_space: str = 'box'
  remat: bool = False

  @classmethod
  def from_config(cls, decoder_cfg: mlc.ConfigDict, **kw) -> TriplaneDecoder:
    """From the `decoder` config section; `kw` sets the fields other sections own (the
    prior's camera and plane axes, wired by `Prior3D.from_config`)."""
    return cls(
      width=int(decoder_cfg.width),
      num_heads=int(decoder_cfg.num_heads),
      num_layers=int(decoder_cfg.num_layers),
      low_res=int(decoder_cfg.low_res),
      up_channels=tuple(int(c) for c in decoder_cfg.up_channels),
      upsample=check_upsample(decoder_cfg.upsample),
      plane_channels=int(decoder_cfg.plane_channels),
      dtype=jnp.dtype(decoder_cfg.dtype),
      remat=bool(decoder_cfg.get('remat', False)),
      **kw,
    )

  @property
  def plane_resolution(self) -> int:
    return self.low_res * 2 ** len(self.up_channels)

  @nn.compact
  def __call__(self, h_bne):
    b = h_bne.shape[0]
    l = self.low_res
    embeddings = self.param(
      'embeddings',
      partitioned(nn.initializers.normal(0.02), ('tokens', 'embed')),
      (3 * l * l, self.width),
    )
    x = jnp.broadcast_to(embeddings.astype(self.dtype), (b, *embeddings.shape))
    h_bne = h_bne.astype(self.dtype)
    bias = None
    if self.prior_camera is not None:
      grid = math.isqrt(h_bne.shape[1] - 1)
      if grid * grid + 1 != h_bne.shape[1]:
        raise ValueError(
          f'the attention prior needs h = cls + a square patch grid, got {h_bne.shape}.'
        )
      bias = camera_attention_bias(
        self.prior_camera, self.plane_axes, l, grid, self.prior_sigma, self.plane_space
      )
      bias = bias.astype(self.dtype)
      if self.prior_heads is not None:
        if not 0 <= self.prior_heads <= self.num_heads:
          raise ValueError(
            f'decoder.attention_prior_heads must be in [0, num_heads={self.num_heads}], got '
            f'{self.prior_heads}.'
          )
        on = (jnp.arange(self.num_heads) < self.prior_heads).astype(self.dtype)
        bias = on[:, None, None] * bias  # (heads, Q, N): zero rows for the unbiased heads.
    for i in range(self.num_layers):
      x = CrossAttentionBlock(self.num_heads, dtype=self.dtype, name=f'block{i}')(x, h_bne, bias)
    x = layer_norm('norm', self.dtype)(x)
    # Planes fold into the batch: each is upsampled on its own, with shared weights.
    x = x.reshape(b * 3, l, l, self.width)
    upsample = nn.remat(_upsample_to_planes) if self.remat else _upsample_to_planes
    x = upsample(self, x)
    r = self.plane_resolution
    return x.reshape(b, 3, r, r, self.plane_channels).astype(jnp.float32)
