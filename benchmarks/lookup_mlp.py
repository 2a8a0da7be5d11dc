"""The triplane lookup + point MLP, forward and backward: `render.lookup` 'xla' against 'pallas'.

  python benchmarks/lookup_mlp.py [--points=4194304] [--steps=20] [--blocks=128,256] [--json=PATH]

Times `jax.grad` of a loss over the point MLP's outputs (colour, raw density) at `--points` random world points
(the renderer's one pass over a GPU chunk: 262 144 rays × 16 samples) on 128² × 32 float32
planes, once per lookup, side by side in one process: the unfused program
(`sample_planes_mean` with the GPU's fused taps, then `point_mlp`) and the Pallas kernel
(render/fused.py) with each of `--blocks` points per forward program (the renderer uses
256). Median wall time of `--steps` calls after a warm-up, with
`block_until_ready`. Meant for a GPU; on a CPU the kernel runs in Pallas' interpreter (slowly:
use --points=16384).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from triplane3d.models.triplane import point_mlp
from triplane3d.render.fused import fused_logits, point_outputs
from triplane3d.render.planes import sample_planes_mean

_POINTS = flags.DEFINE_integer('points', 262144 * 16, 'Points per call.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed calls per lookup.')
_BLOCKS = flags.DEFINE_list('blocks', ['128', '256'], "Forward block sizes of 'pallas' to time.")
_JSON = flags.DEFINE_string('json', None, 'Also write the results here.')


def _grad_fn(lookup: str):
  def logits(planes, params, points):
    if lookup.startswith('pallas'):
      block = int(lookup.split('_')[1])
      rgb, raw = point_outputs(fused_logits(planes, points, params, 2.0, block=block))
    else:
      rgb, raw = point_mlp(params, sample_planes_mean(planes, points, 2.0, taps='fused'))
    return jnp.concatenate([raw, rgb], axis=-1)

  def loss(planes, params, points, weights):
    return jnp.sum(logits(planes, params, points) * weights)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv):
  del argv
  k = jax.random.split(jax.random.key(0), 6)
  n = _POINTS.value
  planes = jax.random.normal(k[0], (3, 128, 128, 32))
  params = {
    'hidden': {'kernel': jax.random.normal(k[1], (32, 64)) / 6, 'bias': jnp.zeros(64)},
    'out': {'kernel': jax.random.normal(k[2], (64, 4)) / 8, 'bias': jnp.zeros(4)},
  }
  points = jax.random.uniform(k[3], (n, 3), minval=-1.0, maxval=1.0)
  weights = jax.random.normal(k[4], (n, 4))
  report = {'device': str(jax.devices()[0]), 'points': n, 'steps': _STEPS.value}
  results = {}
  lookups = ['xla', *(f'pallas_{b}' for b in _BLOCKS.value)]
  for lookup in lookups:
    fn = _grad_fn(lookup)
    start = time.perf_counter()
    compiled = fn.lower(planes, params, points, weights).compile()
    compile_s = time.perf_counter() - start
    results[lookup] = jax.block_until_ready(compiled(planes, params, points, weights))
    times = []
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      jax.block_until_ready(compiled(planes, params, points, weights))
      times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    report[lookup] = {
      'compile_s': round(compile_s, 2),
      'median_ms': round(1e3 * float(np.median(times)), 3),
      'min_ms': round(1e3 * min(times), 3),
      'temp_bytes': int(getattr(memory, 'temp_size_in_bytes', 0)),
    }
    print(lookup, report[lookup], flush=True)
  # The programs compute the same values up to rounding (TF32 matmuls on GPUs).
  loss_x, grad_x = results['xla']
  for lookup in lookups[1:]:
    loss_p, grad_p = results[lookup]
    report[lookup]['loss_rel_diff'] = float(abs(loss_p - loss_x) / abs(loss_x))
    report[lookup]['grad_max_rel_diff'] = max(
      float(jnp.abs(a - b).max() / jnp.abs(a).max())
      for a, b in zip(jax.tree.leaves(grad_x), jax.tree.leaves(grad_p))
    )
    report[lookup]['speedup'] = round(report['xla']['median_ms'] / report[lookup]['median_ms'], 3)
  print(json.dumps(report))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  app.run(main)
