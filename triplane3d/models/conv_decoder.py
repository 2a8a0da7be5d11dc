"""The "no triplane" ablation: a convolutional decoder from h straight to RGB and depth.

The class token is dropped and the patch tokens (B, N, E) are laid out on their g×g grid
(N = g²), projected to D_dec channels, then upsampled by ×2 blocks (bilinear → 3×3 conv →
GELU) until the grid reaches the render resolution (a final bilinear resize covers
resolutions that are not g·2^k). A 3×3 conv gives 4 channels: RGB = sigmoid (in [0, 1]) and
depth = near + (far − near)·sigmoid, so depth lies in the renderer's [near, far].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from triplane3d.models.layers import Dtype, UpsampleBlock, check_upsample, conv, dense, layer_norm


class ConvDecoder(nn.Module):
  """h (B, 1 + g², E) → (rgb (B, R, R, 3) in [0, 1], depth (B, R, R, 1) in [near, far]).

  Attributes:
    width: channels after the input projection (decoder.width).
    up_channels: channels of the ×2 blocks; the last entry repeats if more blocks are needed.
    upsample: the blocks' kind, 'bilinear' or 'shuffle' (`layers.UpsampleBlock`).
    resolution: R, the output side (render.resolution).
    near, far: the depth range (camera.near / camera.far).
    dtype: computation dtype (parameters stay float32).
  """

  width: int = 512
  up_channels: Sequence[int] = (256, 128, 64)
  upsample: str = 'bilinear'
  resolution: int = 256
  near: float = 1.5
  far: float = 2.5
  dtype: Dtype = jnp.float32

  @classmethod
  def from_config(
    cls, decoder_cfg: mlc.ConfigDict, *, resolution: int, near: float, far: float
  ) -> ConvDecoder:
    """From the `decoder` config section; the output resolution and depth range belong to
    other sections (render, camera) and are wired by `Prior3D.from_config`."""
    return cls(
      width=int(decoder_cfg.width),
      up_channels=tuple(int(c) for c in decoder_cfg.up_channels),
      upsample=check_upsample(decoder_cfg.upsample),
      resolution=int(resolution),
      near=float(near),
      far=float(far),
      dtype=jnp.dtype(decoder_cfg.dtype),
    )

  @nn.compact
  def __call__(self, h_bne):
    b, n, e = h_bne.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
      raise ValueError(f'expected 1 + g² tokens (cls + a square patch grid), got {n}.')
    x = h_bne[:, 1:].astype(self.dtype).reshape(b, g, g, e)
    x = layer_norm('norm', self.dtype)(x)
    x = dense(self.width, 'embed', ('channels',), 'proj', self.dtype)(x)
    num_up = max(0, math.ceil(math.log2(self.resolution / g)))
    channels = list(self.up_channels[:num_up])
    channels += [self.up_channels[-1]] * (num_up - len(channels))
    for i, ch in enumerate(channels):
      x = UpsampleBlock(ch, self.dtype, self.upsample, name=f'up{i}')(x)
    if x.shape[1] != self.resolution:
      x = jax.image.resize(x, (b, self.resolution, self.resolution, x.shape[-1]), 'bilinear')
    x = conv(4, 3, 'head', self.dtype)(x).astype(jnp.float32)
    rgb = jax.nn.sigmoid(x[..., :3])
    depth = self.near + (self.far - self.near) * jax.nn.sigmoid(x[..., 3:])
    return rgb, depth
