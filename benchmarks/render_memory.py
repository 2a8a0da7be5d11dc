"""Memory and speed of the renderer: forward + backward for one 256×256 image.

  python benchmarks/render_memory.py [--resolution=256] [--chunks=8192,4096,0] [--repeats=2]

Reports the compiled temporary memory (`memory_analysis().temp_size_in_bytes`, CPU backend)
of value-and-grad (w.r.t. planes and MLP params) of a loss on the renderer's outputs, for
128×128×32 planes, 16 + 16 samples per ray, chunked and unchunked, and the wall time per
image. Issue 3 requires the chunked figure to be <= 256 MiB: chunks of 4096 rays give
146.5 MiB (8192: 271.5 MiB; unchunked: 2012 MiB), measured with jax 0.10.2 on CPU.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from triplane3d.models.triplane import PointMLP, point_mlp
from triplane3d.render import RenderOptions, render_image


def make_step(options: RenderOptions):
  """A jitted value-and-grad of a loss touching every renderer output."""

  def loss(planes, mlp_params, key):
    out = render_image(planes, mlp_params, key, decode_fn=point_mlp, options=options)
    return (
      jnp.mean(out.rgb**2) + jnp.mean(out.depth) + jnp.mean(out.opacity) + jnp.mean(out.densities)
    )

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def make_inputs(channels: int = 32, plane_res: int = 128, hidden: int = 64):
  """Random (3, R, R, C) planes and PointMLP params."""
  k_planes, k_mlp = jax.random.split(jax.random.PRNGKey(0))
  planes = jax.random.normal(k_planes, (3, plane_res, plane_res, channels), jnp.float32)
  variables = PointMLP(hidden).init(k_mlp, jnp.zeros((1, channels)))
  return planes, nn.unbox(variables)['params']


def temp_bytes(step, *args) -> int:
  """Compiled temporary buffer size of `step` on these arguments."""
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--resolution', type=int, default=256)
  parser.add_argument('--chunks', default='8192,4096,0')
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  planes, mlp_params = make_inputs()
  key = jax.random.PRNGKey(1)
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.resolution}² image, 16+16')
  for chunk in (int(c) for c in args.chunks.split(',')):
    options = RenderOptions(resolution=args.resolution, num_coarse=16, num_fine=16, chunk=chunk)
    step = make_step(options)
    mib = temp_bytes(step, planes, mlp_params, key) / 2**20
    jax.block_until_ready(step(planes, mlp_params, key))  # Compile + warm up.
    t0 = time.perf_counter()
    for _ in range(args.repeats):
      jax.block_until_ready(step(planes, mlp_params, key))
    sec = (time.perf_counter() - t0) / args.repeats
    name = f'chunk={chunk}' if chunk else 'unchunked'
    print(f'{name:>12}: temp {mib:8.1f} MiB, fwd+bwd {sec:6.2f} s / image', flush=True)


if __name__ == '__main__':
  main()
