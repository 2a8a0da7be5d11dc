"""3D-Prior wiring: student backbone → representation h → decoder → renderer (+ teacher h).

Parameters are one plain pytree `{'backbone', 'decoder', 'mlp'}` ('mlp' only with the triplane
decoder); the frozen teacher is a separate backbone pytree of the same structure. Keeping the
pieces as separate linen modules (rather than one module that renders) lets the renderer stay a
pure function of `(planes, mlp_params)`, and lets the trainer shard, freeze or export each
piece by its path.

Shapes: images (B, S, S, 3) ImageNet-normalised; h (B, 1 + N, L·D) with N patches and L =
`num_layers_h` blocks; rendered outputs are per ray, n = rays per image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from triplane3d import render
from triplane3d.models import vit
from triplane3d.models.conv_decoder import ConvDecoder
from triplane3d.models.triplane import PointMLP, TriplaneDecoder, point_mlp


@dataclasses.dataclass(frozen=True)
class Prior3D:
  """The 3D-Prior model: stateless; all parameters are passed in."""

  backbone: vit.DinoViT
  decoder: nn.Module  # TriplaneDecoder or ConvDecoder.
  mlp: PointMLP | None
  options: render.RenderOptions
  img_size: int
  num_layers_h: int = 4
  act_sharding: Any = None  # Sharding of (B, ...) activations (batch over data × fsdp).

  @classmethod
  def from_config(cls, config: mlc.ConfigDict, act_sharding=None) -> Prior3D:
    m = config.model
    backbone = vit.create(
      m.variant,
      dtype=jnp.dtype(m.dtype),
      remat=m.remat,
      remat_policy=str(m.get('remat_policy', 'full')),
      scan_blocks=bool(m.get('scan_blocks', False)),
      drop_path_rate=m.drop_path_rate,
      act_sharding=act_sharding,
    )
    camera = render.Camera.from_config(config.camera)
    if config.decoder.kind == 'triplane':
      prior = config.decoder.attention_prior
      if prior not in ('none', 'camera'):
        raise ValueError(f"decoder.attention_prior must be 'none' or 'camera', got {prior!r}.")
      decoder = TriplaneDecoder.from_config(
        config.decoder,
        prior_camera=camera if prior == 'camera' else None,
        prior_sigma=float(config.decoder.attention_prior_sigma),
        prior_heads=config.decoder.attention_prior_heads,
        plane_axes=str(config.render.plane_axes),
        plane_space=str(config.render.plane_space),
      )
      mlp = PointMLP.from_config(config.render)
    elif config.decoder.kind == 'conv':
      decoder = ConvDecoder.from_config(
        config.decoder,
        resolution=config.render.resolution,
        near=camera.near,
        far=camera.far,
      )
      mlp = None
    else:
      raise ValueError(f"decoder.kind must be 'triplane' or 'conv', got {config.decoder.kind!r}.")
    return cls(
      backbone=backbone,
      decoder=decoder,
      mlp=mlp,
      options=render.RenderOptions.from_config(config.render, camera),
      img_size=int(m.img_size),
      num_layers_h=int(m.num_layers_h),
      act_sharding=act_sharding,
    )

  def _constrain(self, x):
    if self.act_sharding is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.act_sharding)

  def _batch_shards(self, batch: int) -> int:
    """Slices the batch axis of (batch, ...) activations is split into over devices, for
    `render.render_batch` (1 when unsharded, or when the batch does not split evenly, as a
    held-out set may not: it then renders as one slice)."""
    if self.act_sharding is None or not self.act_sharding.spec:
      return 1
    axes = self.act_sharding.spec[0] or ()
    axes = (axes,) if isinstance(axes, str) else axes
    shards = math.prod(self.act_sharding.mesh.shape[a] for a in axes)
    return shards if batch % shards == 0 else 1

  @property
  def decode_fn(self):
    """The point decoder the renderer calls: `point_mlp` in `render.mlp_dtype`."""
    return functools.partial(point_mlp, dtype=self.mlp.dtype)

  @property
  def num_tokens(self) -> int:
    return 1 + (self.img_size // self.backbone.patch_size) ** 2

  def init(self, rng: jax.Array) -> dict:
    """Boxed (nn.Partitioned) parameters; use under `jax.eval_shape` for shardings."""
    k_b, k_d, k_m = jax.random.split(rng, 3)
    x = jnp.zeros((1, self.img_size, self.img_size, 3), jnp.float32)
    h = jnp.zeros((1, self.num_tokens, self.num_layers_h * self.backbone.width), jnp.float32)
    params = {
      'backbone': self.backbone.init(k_b, x)['params'],
      'decoder': self.decoder.init(k_d, h)['params'],
    }
    if self.mlp is not None:
      c = self.decoder.plane_channels
      params['mlp'] = self.mlp.init(k_m, jnp.zeros((1, c), jnp.float32))['params']
    return params

  def representation(self, backbone_params, images, *, rng=None) -> jax.Array:
    """h: normed class + patch tokens of the last `num_layers_h` blocks, (B, 1 + N, L·D).

    `rng` (for stochastic depth) makes the pass stochastic; None is deterministic.
    """
    layers = self.backbone.apply(
      {'params': backbone_params},
      images,
      n=self.num_layers_h,
      return_class_token=True,
      norm=True,
      deterministic=rng is None,
      rngs=None if rng is None else {'dropout': rng},
      method='get_intermediate_layers',
    )
    tokens = [jnp.concatenate([cls[:, None], patch], axis=1) for patch, cls in layers]
    return self._constrain(jnp.concatenate(tokens, axis=-1))

  def reconstruct(self, params, h, key, *, full: bool = False) -> dict[str, jax.Array]:
    """Decodes h and renders: rgb (B, n, 3), depth (B, n, 1), densities (B, n, k) and planes
    (B, 3, H, W, C) (triplane only), ray_indices (B, n). `full=True` renders every pixel
    whatever `rays_per_image`. `key`: one key per image (B,), or one split over the batch
    (`render.render_batch`)."""
    opts = dataclasses.replace(self.options, rays_per_image=0) if full else self.options
    if self.mlp is None:
      rgb, depth = self.decoder.apply({'params': params['decoder']}, h)
      per_image = jax.random.key_data(key).ndim > 1  # As render.render_batch.
      keys = key if per_image else jax.random.split(key, rgb.shape[0])
      idx = jax.vmap(lambda k: render.draw_rays(k, opts))(keys)
      take = jax.vmap(render.gather_pixels)
      return {'rgb': take(rgb, idx), 'depth': take(depth, idx), 'ray_indices': idx}
    planes = self.decoder.apply({'params': params['decoder']}, h)
    planes = self._constrain(planes)
    with jax.named_scope('render'):  # For profiles (triplane3d.device_time).
      out = render.render_batch(
        planes,
        params['mlp'],
        key,
        decode_fn=self.decode_fn,
        options=opts,
        batch_shards=self._batch_shards(planes.shape[0]),
      )
    return {
      'rgb': out.rgb,
      'depth': out.depth,
      'opacity': out.opacity,
      'densities': out.densities,
      'ray_indices': out.ray_indices,
      'planes': planes,  # For novel views (reconstruct); unused outputs cost nothing under jit.
    }


def unbox(tree: Any) -> Any:
  """Plain arrays from a boxed (nn.Partitioned) parameter tree."""
  return nn.meta.unbox(tree)
