"""The renderer's compiled memory bound (issue 3): compilation only, no execution.

Forward + backward of one 256×256 image, 16 + 16 samples, 128×128×32 planes, rendered in
chunks of 4096 rays: the CPU backend's temporary buffers must stay within 256 MiB.
benchmarks/render_memory.py prints the same figure beside the unchunked one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from triplane3d.models.triplane import PointMLP, point_mlp
from triplane3d.render import RenderOptions, render_image


def test_chunked_fwd_bwd_temp_memory_within_256_mib():
  options = RenderOptions(resolution=256, num_coarse=16, num_fine=16, chunk=4096)

  def loss(planes, params, key):
    out = render_image(planes, params, key, decode_fn=point_mlp, options=options)
    return jnp.mean(out.rgb) + jnp.mean(out.depth) + jnp.mean(out.densities)

  planes = jax.ShapeDtypeStruct((3, 128, 128, 32), jnp.float32)
  params = nn.unbox(jax.eval_shape(PointMLP(64).init, jax.random.PRNGKey(0), jnp.zeros((1, 32))))
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(planes, params['params'], key).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 256 * 2**20, f'{temp / 2**20:.1f} MiB'
