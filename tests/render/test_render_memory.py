"""The renderer's compiled memory bounds (issues 3 and 13): compilation only, no execution.

Forward + backward of 256×256 images, 16 + 16 samples, 128×128×32 planes, rendered in chunks
of 4096 rays: one image's CPU temporaries stay within 256 MiB, and a batch's grow by little
more than its planes and per-ray outputs per image. benchmarks/render_memory.py prints the
one-image figure beside the unchunked one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from triplane3d.models.triplane import PointMLP, point_mlp
from triplane3d.render import RenderOptions, render_batch, render_image

MIB = 2**20
OPTIONS = RenderOptions(resolution=256, num_coarse=16, num_fine=16, chunk=4096)


def _temp_bytes(render, planes_shape) -> int:
  def loss(planes, params, key):
    out = render(planes, params, key, decode_fn=point_mlp, options=OPTIONS)
    return jnp.mean(out.rgb) + jnp.mean(out.depth) + jnp.mean(out.densities)

  planes = jax.ShapeDtypeStruct(planes_shape, jnp.float32)
  params = nn.unbox(jax.eval_shape(PointMLP(64).init, jax.random.PRNGKey(0), jnp.zeros((1, 32))))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(planes, params['params'], key).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_fwd_bwd_temp_memory_within_256_mib():
  temp = _temp_bytes(render_image, (3, 128, 128, 32))
  assert temp <= 256 * MIB, f'{temp / MIB:.1f} MiB'


def test_batch_temp_memory_does_not_grow_by_a_chunk_per_image():
  # Under vmap every chunk step rendered 4096 rays of every image: +164 MiB per image
  # (2 → 8 images). Chunked across the batch: +6 MiB, one image's planes (float32).
  small, large = (_temp_bytes(render_batch, (b, 3, 128, 128, 32)) for b in (2, 8))
  per_image = (large - small) / 6
  assert per_image <= 32 * MIB, f'{per_image / MIB:.1f} MiB per image'
