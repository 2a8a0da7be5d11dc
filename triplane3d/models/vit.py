"""DINOv2 Vision Transformer in Flax linen, numerically faithful to the PyTorch original.

Faithfulness points (docs/method.md, "DINOv2: what a port must match"): pre-norm blocks,
LayerNorm eps 1e-6, exact (erf) GELU, LayerScale on both residual branches, fused qkv with
output axis ordered (3, heads, head_dim), SwiGLU for ViT-g, registers inserted after the
positional embedding is added, and the 37×37 positional table kept as the parameter and
resized in the forward pass exactly as DINOv2 does (see `pos_embed.py`), so a fine-tuned model
exports back losslessly.

Parameter names mirror the official checkpoint keys (`cls_token`, `pos_embed`,
`patch_embed/kernel`, `blocks_3/attn/qkv/kernel`, `blocks_3/ls1/gamma`, `norm/scale`, ...),
which keeps `triplane3d.convert` a table of renames and transposes.

Shapes: images are NHWC float32, ImageNet-normalised, H and W multiples of 14. Tokens are
(B, 1 + R + h·w, D): class token, R register tokens, then patches in row-major order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from triplane3d.models import layers
from triplane3d.models import pos_embed as pos_lib
from triplane3d.models.layers import Dtype, partitioned

# name: (width, depth, heads, ffn). Each also exists as '<name>_reg', with 4 register tokens
# and DINOv2's register behaviour of the positional resize (by size, antialiased).
_SIZES = {
  'vit_tiny14': (64, 4, 4, 'mlp'),  # Not a DINOv2 release: tests and the laptop demo.
  'vits14': (384, 12, 6, 'mlp'),
  'vitb14': (768, 12, 12, 'mlp'),
  'vitl14': (1024, 24, 16, 'mlp'),
  'vitg14': (1536, 40, 24, 'swiglu'),
}
VARIANTS = tuple(_SIZES) + tuple(f'{k}_reg' for k in _SIZES)

# What a rematerialised block saves for the backward pass (`model.remat_policy`). 'full':
# nothing but its input, everything is recomputed. 'dots': the outputs of matmuls without batch
# dimensions (qkv, attention output projection, MLP; not the attention logits), so only the
# cheap element-wise work and the attention itself are recomputed.
REMAT_POLICIES = {
  'full': None,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a `model.remat_policy` name (see `REMAT_POLICIES`)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'model.remat_policy must be one of {list(REMAT_POLICIES)}, got {name!r}.')
  return REMAT_POLICIES[name]


def _dense(features: int, names: tuple[str | None, str | None], dtype: Dtype, name: str):
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=partitioned(nn.initializers.truncated_normal(0.02), names),
    bias_init=partitioned(nn.initializers.zeros, (names[1],)),
    name=name,
  )


class LayerScale(nn.Module):
  """Per-channel scaling of a residual branch (`ls1.gamma` / `ls2.gamma`)."""

  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param(
      'gamma',
      partitioned(nn.initializers.constant(self.init_value), ('embed',)),
      (x.shape[-1],),
      jnp.float32,
    )
    return x * gamma.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (output ordered 3, heads, dim)."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bnd):
    b, n, d = x_bnd.shape
    hd = d // self.num_heads
    qkv = _dense(3 * d, ('embed', 'mlp'), self.dtype, 'qkv')(x_bnd)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * (hd**-0.5), k)
    # Softmax in float32 whatever the computation dtype: bf16 logits lose too much.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d)
    return _dense(d, ('mlp', 'embed'), self.dtype, 'proj')(out)


class Mlp(nn.Module):
  """fc1 → exact GELU → fc2 (S/B/L)."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = _dense(self.hidden, ('embed', 'mlp'), self.dtype, 'fc1')(x)
    x = nn.gelu(x, approximate=False)  # DINOv2 uses torch's exact erf GELU.
    return _dense(d, ('mlp', 'embed'), self.dtype, 'fc2')(x)


class SwiGLU(nn.Module):
  """w12 (2·hidden) → silu(a)·b → w3 (ViT-g)."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    a, b = jnp.split(_dense(2 * self.hidden, ('embed', 'mlp'), self.dtype, 'w12')(x), 2, -1)
    return _dense(d, ('mlp', 'embed'), self.dtype, 'w3')(nn.silu(a) * b)


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
  """DINOv2's SwiGLU hidden size: 2/3 of the MLP hidden, rounded up to a multiple of 8."""
  return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale and optional stochastic depth."""

  num_heads: int
  ffn: str
  mlp_ratio: float = 4.0
  layerscale_init: float = 1e-5
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]
    if self.ffn == 'swiglu':
      ffn = SwiGLU(swiglu_hidden(d, self.mlp_ratio), self.dtype, name='mlp')
    else:
      ffn = Mlp(int(d * self.mlp_ratio), self.dtype, name='mlp')
    y = Attention(self.num_heads, self.dtype, name='attn')(
      layers.layer_norm('norm1', self.dtype)(x)
    )
    x = x + self._drop(LayerScale(self.layerscale_init, name='ls1')(y), deterministic)
    y = ffn(layers.layer_norm('norm2', self.dtype)(x))
    return x + self._drop(LayerScale(self.layerscale_init, name='ls2')(y), deterministic)

  def _drop(self, y, deterministic):
    if deterministic or self.drop_path == 0.0:
      return y
    keep = 1.0 - self.drop_path
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, 0).astype(y.dtype)


class DinoViT(nn.Module):
  """DINOv2 ViT. See the module docstring for conventions; build with `create(variant)`."""

  width: int
  depth: int
  num_heads: int
  ffn: str = 'mlp'
  mlp_ratio: float = 4.0
  patch_size: int = 14
  num_registers: int = 0
  pos_grid: int = 37  # Released checkpoints: 518 px / 14.
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  layerscale_init: float = 1e-5
  drop_path_rate: float = 0.0
  remat: bool = False
  remat_policy: str = 'full'  # 'full': keep nothing; 'dots': keep matmul outputs (REMAT_POLICIES).
  # Run the blocks as one `lax.scan` over their stacked parameters (the parameter tree keeps
  # its per-block names): XLA compiles one block instead of `depth`. Needs drop_path_rate 0.
  scan_blocks: bool = False
  dtype: Dtype = jnp.float32
  # Optional sharding of activations (B, ...) between blocks, e.g. the batch over data × fsdp;
  # keeps FSDP from trading batch sharding for weight-stationary layouts. None: no constraint.
  act_sharding: Any = None

  def setup(self):
    d = self.width
    init = nn.initializers.truncated_normal(0.02)
    self.patch_embed = nn.Conv(
      d,
      (self.patch_size, self.patch_size),
      strides=self.patch_size,
      padding='VALID',
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=partitioned(init, ('spatial', 'spatial', 'conv_in', 'embed')),
      bias_init=partitioned(nn.initializers.zeros, ('embed',)),
    )
    tok = partitioned
    self.cls_token = self.param('cls_token', tok(init, (None, None, 'embed')), (1, 1, d))
    n_pos = 1 + self.pos_grid**2
    self.pos_embed = self.param('pos_embed', tok(init, (None, 'tokens', 'embed')), (1, n_pos, d))
    if self.num_registers:
      self.register_tokens = self.param(
        'register_tokens', tok(init, (None, 'tokens', 'embed')), (1, self.num_registers, d)
      )
    # Unused by 3D-Prior; kept so checkpoints round-trip with every key (DINOv2 masks iBOT
    # patches with it).
    self.mask_token = self.param('mask_token', tok(nn.initializers.zeros, (None, 'embed')), (1, d))
    policy = remat_policy(self.remat_policy)  # Checked even when unused: a typo fails early.
    block_cls = nn.remat(Block, static_argnums=(2,), policy=policy) if self.remat else Block
    rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
    self.blocks = [
      block_cls(
        self.num_heads,
        self.ffn,
        self.mlp_ratio,
        self.layerscale_init,
        rates[i],
        self.dtype,
        name=f'blocks_{i}',
      )
      for i in range(self.depth)
    ]
    self.norm = layers.layer_norm('norm', self.dtype)

  def _positional(self, h: int, w: int) -> jax.Array:
    """The (1, 1 + h·w, D) float32 positional embedding for an h×w patch grid."""
    m = self.pos_grid
    if h == m and w == m:
      return self.pos_embed.astype(jnp.float32)
    grid = self.pos_embed[0, 1:].reshape(m, m, self.width)
    patch = pos_lib.resize_pos_grid(
      grid, h, w, offset=self.interpolate_offset, antialias=self.interpolate_antialias
    ).reshape(1, h * w, self.width)
    return jnp.concatenate([self.pos_embed[:, :1].astype(jnp.float32), patch], axis=1)

  def prepare_tokens(self, x_bhwc: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) → tokens (B, 1 + R + h·w, D) in the computation dtype."""
    b, hh, ww, _ = x_bhwc.shape
    p = self.patch_size
    if hh % p or ww % p:
      raise ValueError(f'image size {hh}×{ww} is not a multiple of the patch size {p}.')
    x = self.patch_embed(x_bhwc.astype(self.dtype))  # (B, h, w, D)
    h, w = x.shape[1:3]
    x = x.reshape(b, h * w, self.width)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, self.width)).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    x = (x.astype(jnp.float32) + self._positional(h, w)).astype(self.dtype)
    if self.num_registers:
      reg = jnp.broadcast_to(self.register_tokens, (b, self.num_registers, self.width))
      x = jnp.concatenate([x[:, :1], reg.astype(x.dtype), x[:, 1:]], axis=1)
    return x

  def _run_blocks(self, x, first: int, stop: int, deterministic: bool) -> list[jax.Array]:
    """The outputs (B, T, D) of blocks first … stop-1 (all of 0 … stop-1 run)."""
    if self.scan_blocks and not self.is_initializing():
      if first == stop - 1:  # The last output alone: one scan that keeps no stack.
        return self._scan_blocks(x, 0, stop, deterministic, collect=False)
      # Two scans: the outputs before `first` are never stacked in memory.
      x = self._scan_blocks(x, 0, first, deterministic, collect=False)[-1] if first else x
      return self._scan_blocks(x, first, stop, deterministic, collect=True)
    outs = []
    for blk in self.blocks[:stop]:
      if self.act_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, self.act_sharding)
      x = blk(x, deterministic)
      outs.append(x)
    return outs[first:]

  def _scan_blocks(
    self, x, start: int, stop: int, deterministic: bool, collect: bool
  ) -> list[jax.Array]:
    """Blocks start … stop-1 as a `lax.scan` of one block over their stacked parameters: each
    block's output, or (not `collect`) only the last."""
    if self.drop_path_rate and not deterministic:
      raise ValueError(
        'model.scan_blocks runs every block with the same code and cannot give each block its '
        'own stochastic-depth rate: set model.drop_path_rate=0 or model.scan_blocks=False.'
      )
    params = [nn.meta.unbox(self.blocks[i].variables['params']) for i in range(start, stop)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)
    # A detached module (parent=None), applied functionally to each block's parameters.
    block = Block(
      self.num_heads, self.ffn, self.mlp_ratio, self.layerscale_init, 0.0, self.dtype, parent=None
    )
    sharding = self.act_sharding

    def body(x, p):
      if sharding is not None:
        x = jax.lax.with_sharding_constraint(x, sharding)
      y = block.apply({'params': p}, x, True)
      return y, (y if collect else None)

    if self.remat:
      body = jax.checkpoint(body, policy=remat_policy(self.remat_policy), prevent_cse=False)
    last, ys = jax.lax.scan(body, x, stacked)
    return [ys[i] for i in range(stop - start)] if collect else [last]

  def __call__(self, x_bhwc, deterministic: bool = True) -> dict[str, jax.Array]:
    """DINOv2's `forward_features`: normed class (B, D), register (B, R, D), patch (B, h·w, D)."""
    tokens = self.prepare_tokens(x_bhwc)
    x = self.norm(self._run_blocks(tokens, self.depth - 1, self.depth, deterministic)[-1])
    r = 1 + self.num_registers
    return {
      'x_norm_clstoken': x[:, 0],
      'x_norm_regtokens': x[:, 1:r],
      'x_norm_patchtokens': x[:, r:],
    }

  def get_intermediate_layers(
    self,
    x_bhwc: jax.Array,
    n: int | Sequence[int] = 1,
    return_class_token: bool = False,
    norm: bool = True,
    deterministic: bool = True,
  ) -> tuple:
    """DINOv2's `get_intermediate_layers` (reshape=False).

    Args:
      x_bhwc: (B, H, W, 3) normalised images.
      n: an int (the last n blocks) or a list of block indices (0-based).
      return_class_token: also return each layer's class token.
      norm: pass every selected output through the final LayerNorm.

    Returns:
      A tuple with one entry per selected block, in block order: the patch tokens (B, h·w, D)
      (registers dropped), or `(patch_tokens, class_token (B, D))` with `return_class_token`.
    """
    idx = list(range(self.depth - n, self.depth)) if isinstance(n, int) else list(n)
    if not idx or min(idx) < 0 or max(idx) >= self.depth:
      raise ValueError(f'block indices {idx} out of range for a {self.depth}-block model.')
    # Blocks after the last requested one do not influence the result: skip them.
    first = min(idx)
    outs = self._run_blocks(self.prepare_tokens(x_bhwc), first, max(idx) + 1, deterministic)
    sel = [self.norm(outs[i - first]) if norm else outs[i - first] for i in idx]
    r = 1 + self.num_registers
    if return_class_token:
      return tuple((o[:, r:], o[:, 0]) for o in sel)
    return tuple(o[:, r:] for o in sel)


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  width: int
  depth: int
  num_heads: int
  ffn: str
  num_registers: int


def variant_spec(variant: str) -> VariantSpec:
  """Architecture numbers of a named variant (see `VARIANTS`)."""
  base = variant.removesuffix('_reg')
  if base not in _SIZES:
    raise ValueError(f'unknown DINOv2 variant {variant!r}; choose one of {list(VARIANTS)}.')
  width, depth, heads, ffn = _SIZES[base]
  return VariantSpec(width, depth, heads, ffn, 4 if variant.endswith('_reg') else 0)


def create(variant: str, **overrides) -> DinoViT:
  """Builds a `DinoViT` for a named variant; keyword overrides change any module field.

  Example: `create('vitb14', dtype=jnp.bfloat16, remat=True)`.
  """
  s = variant_spec(variant)
  kwargs: dict[str, Any] = dict(
    width=s.width, depth=s.depth, num_heads=s.num_heads, ffn=s.ffn, num_registers=s.num_registers
  )
  if s.num_registers:
    kwargs.update(interpolate_offset=0.0, interpolate_antialias=True)
  if variant.startswith('vit_tiny'):
    kwargs.update(layerscale_init=0.1)  # Trained from scratch only: start from a useful scale.
  unknown = set(overrides) - {f.name for f in dataclasses.fields(DinoViT)}
  if unknown:
    raise TypeError(f'unknown DinoViT fields {sorted(unknown)}.')
  kwargs.update(overrides)
  return DinoViT(**kwargs)


def init_params(model: DinoViT, rng: jax.Array, img_size: int = 224) -> dict:
  """Randomly initialised, unboxed parameters (a plain nested dict)."""
  x = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
  return nn.meta.unbox(model.init(rng, x)['params'])
