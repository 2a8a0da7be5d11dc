"""Benchmark: the real train step's speed, FLOPs and memory, or the input pipeline's rate.

  python -m triplane3d.benchmark --config=configs/demo.py [--config.x=y] [--steps=20]
      [--warmup=2] [--peak_flops=F] [--json=PATH] [--profile=DIR [--profile_steps=2]]
  python -m triplane3d.benchmark --mode=data --config=configs/demo.py --workers=0,2,4 \
      [--accelerator=v5e-8 [--mfu=0.4]] [--float_pixels]

`--mode=step` (default) jits `train.jit_train_step` on every visible device (a data × fsdp
mesh from `config.mesh`) with synthetic in-memory batches (no dataset is read) and reports:
compile time, the median step time over `--steps` steps after `--warmup`
(`block_until_ready`), images/s per device and in total, FLOPs per image (analytic and
XLA's), MFU, and peak memory; `--profile=DIR` then traces `--profile_steps` more steps and
adds their device time by model part and by kernel (`device_time`; on CPU the traced steps run
a second compile that records XLA:CPU's ops). `--mode=data` times
`data.pipeline` alone, in the trainer's uint8 wire format (`--float_pixels` for float32):
images/s per host and the consuming process's CPU ms per image for each `--workers` count, the
decoding's CPU ms per image (0 workers); `--accelerator=v5e-8 [--mfu=0.4]` adds what one host
of that slice consumes at that MFU (and at 100 %) and the cores that takes (`host_need`).

Analytic FLOPs per image (`analytic_flops`; multiply-adds count 2; norms, softmax and other
elementwise work are left out). S = model.img_size, p = 14, N = (S/p)² patches, T = 1 + R + N
tokens (R registers), D the width and L the depth of the ViT, P = 12·D² (MLP ratio 4; SwiGLU:
4·D² + 3·D·H) matmul parameters per block:
  ViT forward  = 2·N·(3p²)·D  +  L·(2·P·T + 4·T²·D)           (patch embedding, blocks, QKᵀ and AV)
  decoder fwd  = cross-attention blocks on Q = 3·l² queries of width W over T tokens of 4·D:
                 2·Q·W² (q) + 4·T·4D·W (k, v) + 4·Q·T·W (attention) + 2·Q·W² (out) + 16·Q·W² (MLP)
               + upsampling: Σ_i 2·9·c_{i-1}·c_i·3·r_i²  (3×3 convs at side r_i = l·2^i, c_0 = W)
               + 2·c_U·C·3·r_U² (the 1×1 projection to C plane channels)
  renderer fwd = rays · (coarse + fine) · (2·(C·H + 4·H) + 24·C)   (point MLP of width H; 12
                 bilinear taps of C channels)
  train step   = 3 × (ViT + decoder + renderer forward)  [+ 1 × ViT forward for the teacher]
(backward ≈ 2× forward; the teacher only runs forward; rematerialisation is not counted, so
XLA's count, which does count it, is expected to be higher.) The conv ablation's decoder:
2·N·4D·W + the same upsampling sum at the render resolution + 2·9·c·4·R².

XLA's count comes from `compiled.cost_analysis()`, which counts a while loop's body once
(`jax.lax.map` over ray chunks, `fori_loop` over plane taps, the accumulation `scan`);
`xla_flops` re-counts each loop body times its trip count (see there). MFU = analytic FLOPs
per second per device / the device's peak (`PEAK_FLOPS`, dense bf16; on CPU the measured
float32 matmul rate of a large jitted matmul, shared by the host's CPU devices; `--peak_flops`
overrides).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from triplane3d import device_time, sharding
from triplane3d.models import vit

# Peak dense bf16 FLOP/s per device (a megacore v4 / v5p device is one chip), by device_kind
# prefix; the first matching entry wins ('TPU v5 lite' is v5e, 'TPU v5' v5p).
PEAK_FLOPS = (
  ('TPU v4', 275e12),
  ('TPU v5 lite', 197e12),
  ('TPU v5', 459e12),
  ('TPU v6 lite', 918e12),
  ('NVIDIA H100', 989e12),
  ('NVIDIA H200', 989e12),
)


def peak_flops(device: jax.Device) -> float | None:
  """The device's peak FLOP/s from `PEAK_FLOPS`, or None (CPU, unknown accelerators)."""
  for prefix, flops in PEAK_FLOPS:
    if device.device_kind.startswith(prefix):
      return flops
  return None


def cpu_matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the best of `reps` jitted float32 (n, n) @ (n, n) matmuls on CPU device 0.

  Uses every core of the host (XLA's CPU thread pool), so it is the host's peak, which the
  host's CPU devices share.
  """
  dev = jax.local_devices(backend='cpu')[0]
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), dev)
  f = jax.jit(lambda x: x @ x)  # Runs where `a` lives.
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def batch_shapes(config: mlc.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of each field of a global training batch as the trainer feeds the step
  (`train.device_batches`: `pipeline.create`'s layout, the pixels uint8)."""
  b, s, r = config.train.batch_size, config.model.img_size, config.render.resolution
  return {
    'image': ((b, s, s, 3), jnp.uint8),
    'rgb': ((b, r, r, 3), jnp.uint8),
    'depth': ((b, r, r, 1), jnp.float32),
    'label': ((b,), jnp.int32),
  }


def analytic_flops(config: mlc.ConfigDict) -> dict[str, float]:
  """FLOPs per image by the formula in the module docstring: the forward of each part and the
  whole train step ('train')."""
  spec = vit.variant_spec(config.model.variant)
  d, p = spec.width, 14
  n = (config.model.img_size // p) ** 2
  t = 1 + spec.num_registers + n
  if spec.ffn == 'swiglu':
    hidden = vit.swiglu_hidden(d)
    per_block = 4 * d * d + 3 * d * hidden
  else:
    per_block = 12 * d * d
  backbone = 2 * n * 3 * p * p * d + spec.depth * (2 * per_block * t + 4 * t * t * d)
  dec, rend = config.decoder, config.render
  e, w, ups = config.model.num_layers_h * d, dec.width, tuple(dec.up_channels)
  if dec.kind == 'triplane':
    q, side = 3 * dec.low_res**2, dec.low_res
    attn = 2 * q * w * w + 4 * t * e * w + 4 * q * t * w + 2 * q * w * w + 16 * q * w * w
    decoder = dec.num_layers * attn
    planes = 3
  else:
    side = math.isqrt(n)
    decoder = 2 * n * e * w
    planes = 1
  c_in = w
  for c in ups if dec.kind == 'triplane' else _conv_channels(ups, side, rend.resolution):
    side *= 2
    decoder += 2 * 9 * c_in * c * planes * side**2
    c_in = c
  if dec.kind == 'triplane':
    decoder += 2 * c_in * dec.plane_channels * planes * side**2
    rays = rend.rays_per_image or rend.resolution**2
    ch, hid = dec.plane_channels, rend.mlp_hidden
    render = rays * (rend.num_coarse + rend.num_fine) * (2 * (ch * hid + 4 * hid) + 24 * ch)
  else:
    decoder += 2 * 9 * c_in * 4 * rend.resolution**2
    render = 0
  teacher = backbone if config.loss.dist_weight > 0 else 0
  parts = {'backbone': backbone, 'decoder': decoder, 'render': render, 'teacher': teacher}
  parts = {k: float(v) for k, v in parts.items()}
  parts['train'] = 3 * (backbone + decoder + render) + teacher
  return parts


def _conv_channels(ups: tuple[int, ...], grid: int, resolution: int) -> list[int]:
  """The conv decoder's block widths: ×2 blocks until the grid reaches the resolution."""
  num = 0
  while grid * 2**num < resolution:
    num += 1
  return list(ups[:num]) + [ups[-1]] * max(0, num - len(ups))


# --- XLA's FLOPs with loop trip counts. ---

_COMPUTATION = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
_WHILE = re.compile(r'while\(%?([\w.\-]+)\), condition=%?([\w.\-]+), body=%?([\w.\-]+)')


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """HLO module text → ({computation name: its lines}, the entry computation's name)."""
  comps: dict[str, list[str]] = {}
  entry, current = '', None
  for line in text.splitlines()[1:]:
    m = _COMPUTATION.match(line) if current is None else None
    if m:
      current = m.group(2)
      comps[current] = [line]
      entry = current if m.group(1) else entry
    elif current is not None:
      comps[current].append(line)
      if line.startswith('}'):
        current = None
  return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]], caller: str) -> int | None:
  """A while loop's trip count: XLA's `known_trip_count` where the backend writes it (CPU,
  GPU), else read off the condition `i < limit` (or `<=`) and i's initial value in the loop
  tuple (TPU). None if neither is readable."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
  if known:
    return int(known.group(1))
  loop_tuple, cond, _ = _WHILE.search(line).groups()
  ins = dict(m.groups() for m in map(_INSTRUCTION.match, comps[cond][1:-1]) if m)
  outer = dict(m.groups() for m in map(_INSTRUCTION.match, comps[caller][1:-1]) if m)
  root = next((x for x in comps[cond] if x.strip().startswith('ROOT ')), '')
  cmp = re.search(r'compare\(%?([\w.\-]+), %?([\w.\-]+)\), direction=(\w+)', root)
  if not cmp:
    return None

  def const(name, table):
    m = re.match(r'\S+ constant\((-?\d+)\)', table.get(name, ''))
    return int(m.group(1)) if m else None

  def index(name):
    m = re.search(r'get-tuple-element\(.*\), index=(\d+)', ins.get(name, ''))
    return int(m.group(1)) if m else None

  a, b, direction = cmp.groups()
  if index(a) is None or const(b, ins) is None:  # `limit > i` reads as `i < limit`.
    a, b, direction = b, a, {'GT': 'LT', 'GE': 'LE'}.get(direction, direction)
  i, limit = index(a), const(b, ins)
  if i is None or limit is None or direction not in ('LT', 'LE'):
    return None
  elements = re.search(r' tuple\((.*)\)', outer.get(loop_tuple, ''))
  names = [x.strip().lstrip('%') for x in elements.group(1).split(',')] if elements else []
  start = const(names[i], outer) if i < len(names) else None
  return max(limit - (start or 0) + (direction == 'LE'), 0)


def xla_flops(compiled: jax.stages.Compiled) -> dict[str, Any]:
  """XLA's FLOPs per device, with every while-loop body counted trip-count times.

  `cost_analysis()` counts each loop body once. Here XLA's own cost analysis is run on each
  loop body (the optimised module re-parsed with the body as its entry), and
      full(c) = once(c) + Σ_loops in c [trips · full(body) − once(body)],
  recursively from the entry. Returns {'once': XLA's number, 'with_trips': full(entry),
  'loops': [(body, trips)], 'unknown_trips': loops whose trip count was unreadable (counted
  once)}.
  """
  from jax._src.lib import _jax  # Private: XLA's HloCostAnalysis on a module.
  from jaxlib import _hlo

  options = _hlo.HloPrintOptions()
  options.print_metadata = False
  module = compiled.runtime_executable().hlo_modules()[0]
  comps, entry = _computations(module.to_string(options))
  client = jax.local_devices(backend='cpu')[0].client
  cache: dict[str, float] = {}
  loops: list[tuple[str, int | None]] = []

  def once(name: str) -> float:
    if name not in cache:
      lines = []
      for c, body in comps.items():
        head = body[0].removeprefix('ENTRY ')
        lines += [('ENTRY ' if c == name else '') + head, *body[1:]]
      sub = _hlo.hlo_module_from_text('HloModule sub\n\n' + '\n'.join(lines))
      cache[name] = float(_jax.hlo_module_cost_analysis(client, sub).get('flops', 0.0))
    return cache[name]

  def full(name: str) -> float:
    total = once(name)
    for line in comps[name]:
      if _WHILE.search(line):
        body = _WHILE.search(line).group(3)
        trips = _trip_count(line, comps, name)
        loops.append((body, trips))
        total += (trips or 1) * full(body) - once(body)
    return total

  reported = float(compiled.cost_analysis().get('flops', 0.0))
  with_trips = full(entry) - once(entry) + reported
  unknown = sum(t is None for _, t in loops)
  return {'once': reported, 'with_trips': with_trips, 'loops': loops, 'unknown_trips': unknown}


# Top-level HLO ops that launch no kernel: bookkeeping of values, buffers and control.
_NO_KERNEL = frozenset({
  'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
  'opt-barrier', 'partition-id', 'replica-id', 'add-dependency',
})  # fmt: skip
_OPCODE = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][a-z\-]*)\(')


def kernel_launches(compiled: jax.stages.Compiled | str) -> dict[str, int]:
  """Kernels one step launches per device, read off the optimised HLO (a compiled step, or
  its module text): each top-level op of an executed computation that is not bookkeeping
  (`_NO_KERNEL`) is one thunk, about one kernel launch (a fusion is one kernel; a cuBLAS call
  one or a few); a while loop runs its body trip-count times, and its condition every trip
  when the count is unknown; a conditional counts its costliest branch.

  The number matters on GPUs: XLA:GPU's runtime launches every thunk from the host, a few µs
  each, so a step of many loop trips of small kernels is bound by launches, not by FLOPs or
  bytes (docs/performance.md, "The step on a GPU"). TPUs run loops on the device.
  Returns {'total': launches, 'in_loops': those inside while loops, 'unknown_trips': loops
  counted once for want of a trip count}.
  """
  if not isinstance(compiled, str):
    compiled = compiled.as_text()
  comps, entry = _computations(compiled)
  unknown = 0

  def count(name: str) -> tuple[int, int]:
    nonlocal unknown
    total = looped = 0
    for line in comps[name][1:]:
      m = _OPCODE.match(line)
      op = m.group(1) if m else None
      if op is None or op in _NO_KERNEL:
        continue
      if op == 'while':
        _, cond, body = _WHILE.search(line).groups()
        trips = _trip_count(line, comps, name)
        unknown += trips is None
        per_trip = count(body)[0]
        if 'known_trip_count' not in line:
          per_trip += count(cond)[0]
        total += (trips or 1) * per_trip
        looped += (trips or 1) * per_trip
      elif op in ('call', 'conditional'):
        branches = re.search(r'branch_computations=\{([^}]*)\}', line)
        callees = re.findall(r'(?:to_apply|true_computation|false_computation)=%?([\w.\-]+)', line)
        callees += re.findall(r'%?([\w.\-]+)', branches.group(1)) if branches else []
        inner = [count(c) for c in callees if c in comps]
        if op == 'conditional':
          total += 1  # The branch index is read on the host.
        t, lp = max(inner, default=(0, 0))
        total, looped = total + t, looped + lp
      else:
        total += 1
    return total, looped

  total, looped = count(entry)
  return {'total': total, 'in_loops': looped, 'unknown_trips': unknown}


def memory_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device memory of a compiled step from `memory_analysis()`: arguments, outputs,
  aliases (donated arguments reused as outputs), temporaries, generated code, and their
  total = arguments + outputs − aliases + temporaries + code."""
  m = compiled.memory_analysis()
  out = {
    'arguments': m.argument_size_in_bytes,
    'outputs': m.output_size_in_bytes,
    'aliases': m.alias_size_in_bytes,
    'temporaries': m.temp_size_in_bytes,
    'code': m.generated_code_size_in_bytes,
  }
  out['total'] = (
    out['arguments'] + out['outputs'] - out['aliases'] + out['temporaries'] + out['code']
  )
  return out


# --- The step benchmark. ---


def synthetic_batch(config: mlc.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """A random global batch as the trainer feeds the step (`batch_shapes`), on the mesh (this
  host's rows)."""
  rng = np.random.default_rng(config.seed)
  rows = config.train.batch_size // jax.process_count()
  near, far = config.camera.near, config.camera.far
  fill = {
    'image': lambda s: rng.integers(0, 256, s, np.uint8),
    'rgb': lambda s: rng.integers(0, 256, s, np.uint8),
    'depth': lambda s: rng.uniform(near, far, s).astype(np.float32),
    'label': lambda s: np.zeros(s, np.int32),
  }
  host = {k: fill[k]((rows, *shape[1:])) for k, (shape, _) in batch_shapes(config).items()}
  return sharding.to_global(host, mesh)


def step_benchmark(
  config: mlc.ConfigDict,
  *,
  steps: int,
  warmup: int,
  peak: float | None = None,
  profile: str | None = None,
  profile_steps: int = 2,
) -> dict[str, Any]:
  """Compiles and times the real train step on the visible devices (see the module
  docstring); `peak`: FLOP/s per device (default: `PEAK_FLOPS`, or the CPU matmul rate).
  `profile`: a directory to trace `profile_steps` more steps into (`jax.profiler`), summarised
  under 'device_time' (`triplane3d.device_time`)."""
  from triplane3d import train

  # Progress on stderr as it happens: a run stopped by a time limit (a lent GPU's) still says
  # how far it got and how long each phase took.
  begin = time.perf_counter()
  progress = lambda what: print(  # noqa: E731
    f'benchmark: {what} ({time.perf_counter() - begin:.1f} s)', file=sys.stderr, flush=True
  )
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, jax.process_count())
  setup = train.build(config, mesh, max(config.train.num_steps, warmup + steps))
  k_init, k_train = jax.random.split(jax.random.key(config.seed))
  # Random weights (the same work as DINOv2's, without a download): the teacher is a copy of
  # the initial backbone, as a new run's, not a second initialisation (one compile less).
  state = train.fresh_state(setup, k_init)
  teacher = train.teacher_params(setup, k_init, initial_backbone=state['params']['backbone'])
  batch = synthetic_batch(config, mesh)
  jax.block_until_ready((state, teacher, batch))
  progress('state, teacher and batch ready')

  start = time.perf_counter()
  lowered = train.jit_train_step(setup, config, k_train).lower(state, teacher, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  progress(f'step compiled in {compile_s:.1f} s')
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, teacher, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  progress(f'{warmup} + {steps} steps run, median {step_s:.4f} s')
  text = compiled.as_text()
  traced = None
  if profile:
    progress('profiling')
    args = (state, teacher, batch)
    traced = profile_steps_of(lowered, compiled, text, args, profile, profile_steps)
    progress(f'{profile_steps} steps traced and summarised')

  devices = mesh.devices.size
  images_per_s = config.train.batch_size / step_s
  analytic = analytic_flops(config)
  xla = xla_flops(compiled)
  per_image = devices / config.train.batch_size  # Per-device FLOPs → per image.
  device = mesh.devices.flat[0]
  peak_source = '--peak_flops'
  if peak is None and device.platform == 'cpu':
    peak = cpu_matmul_peak() / len(jax.local_devices(backend='cpu'))
    peak_source = 'measured float32 matmul (host rate / CPU devices)'
  elif peak is None:
    peak, peak_source = peak_flops(device), 'PEAK_FLOPS (dense bf16)'
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peak_mem = max((s.get('peak_bytes_in_use', 0) for s in stats), default=0)
  memory = memory_bytes(compiled)
  achieved = analytic['train'] * images_per_s / devices
  return {
    'mode': 'step',
    'variant': config.model.variant,
    'platform': device.platform,
    'device_kind': device.device_kind,
    'jax_version': jax.__version__,
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'devices': devices,
    'mesh': dict(mesh.shape),
    'global_batch': config.train.batch_size,
    'compile_s': compile_s,
    'step_s_median': step_s,
    'step_s': times,
    'images_per_s': images_per_s,
    'images_per_s_per_device': images_per_s / devices,
    'flops_per_image_analytic': analytic['train'],
    'flops_per_image_analytic_parts': analytic,
    'flops_per_image_xla': xla['with_trips'] * per_image,
    'flops_per_image_xla_loops_once': xla['once'] * per_image,
    'xla_loops': [[b, t] for b, t in xla['loops']],
    'xla_over_analytic': xla['with_trips'] * per_image / analytic['train'],
    'achieved_flops_per_device': achieved,
    'peak_flops_per_device': peak,
    'peak_source': peak_source,
    'mfu': achieved / peak if peak else None,
    # Launched kernels (thunks) per step and device: what bounds a GPU step of many small
    # kernels (`kernel_launches`).
    'kernel_launches_per_step': kernel_launches(text)['total'],
    'memory_peak_bytes': peak_mem or memory['total'],
    'memory_source': 'device memory_stats' if peak_mem else 'compiled.memory_analysis()',
    'memory_analysis': memory,
    **({'device_time': traced} if traced else {}),
  }


def profile_steps_of(
  lowered: jax.stages.Lowered,
  compiled: jax.stages.Compiled,
  text: str,
  args: tuple,
  logdir: str,
  steps: int,
) -> dict[str, Any]:
  """`device_time.trace_steps` of `steps` more train steps from `args` = (state, teacher,
  batch), with their wall times ('traced_step_s'). `text`: `compiled.as_text()`. On CPU the
  steps run a second compile of `lowered` with `device_time.CPU_TRACE_OPTIONS` (XLA:CPU
  records its ops only then; its first step, outside the trace, warms it up). Failures come
  back as {'error': ...}."""
  state, teacher, batch = args
  try:
    run = compiled
    if next(iter(jax.tree.leaves(state)[0].devices())).platform == 'cpu':
      run = lowered.compile(device_time.CPU_TRACE_OPTIONS)
  except Exception as e:  # The timings taken so far still stand.
    return {'error': f'instrumented compile: {type(e).__name__}: {e}'}
  carry, times = [state], []  # The state is donated: each step takes the last one's output.

  def run_step():
    start = time.perf_counter()
    carry[0], metrics = run(carry[0], teacher, batch)
    jax.block_until_ready((carry[0], metrics))
    times.append(time.perf_counter() - start)

  try:
    if run is not compiled:
      run_step()
  except Exception as e:
    return {'error': f'instrumented step: {type(e).__name__}: {e}'}
  times.clear()
  traced = device_time.trace_steps(
    run_step, logdir, steps, text if run is compiled else run.as_text()
  )
  median = statistics.median(times) if times else None
  return {**traced, 'traced_step_s_median': median, 'traced_step_s': times}


# --- The input-pipeline benchmark. ---


def pipeline_rate(
  config: mlc.ConfigDict, data, steps: int, *, float_pixels: bool = False, drains: int = 3
) -> dict[str, float]:
  """One host's `pipeline.create` iterator over `data`, timed after a warm-up batch (worker
  start-up, first prefetch); `float_pixels` as there (default: the trainer's uint8).

  Returns {'images_per_s', 'main_cpu_ms_per_image'}: the rate over `steps` batches and this
  process's CPU time (all its threads) per image meanwhile. With no workers that is the whole
  cost of reading, decoding and augmenting an image. With workers it also counts the process
  polling while it waits for them, so they add 'take_cpu_ms_per_image': what taking the
  workers' batches costs it per image when they keep up — its threads read each batch out of
  shared memory as it comes, so whole cycles are timed (draw the batches the workers' buffers
  hold, then wait while they refill; `drains` cycles), less what the same wait costs with
  nothing to take. The one consuming process caps a host near 1000 / that images/s however
  many cores decode. Placing the batches on the devices (`sharding.to_global`, in the same
  process) is not included.
  """
  from triplane3d.data import pipeline

  it = pipeline.create(config, data, block=0, process_count=1, float_pixels=float_pixels)
  next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(it)
  cpu, wall = time.process_time() - cpu, time.perf_counter() - start
  batch = config.train.batch_size
  out = {'images_per_s': steps * batch / wall, 'main_cpu_ms_per_image': 1e3 * cpu / (steps * batch)}
  if config.data.num_workers:
    ready = config.data.num_workers * config.data.prefetch  # The workers' buffers, in batches.
    pause = 0.1 + 2 * ready * batch / out['images_per_s']  # Twice the time to refill them.
    time.sleep(pause)
    cpu = time.process_time()
    time.sleep(pause)  # Buffers full: nothing to take.
    idle = time.process_time() - cpu
    spent = 0.0
    for _ in range(drains):
      cpu = time.process_time()
      for _ in range(ready):
        next(it)
      time.sleep(pause)
      spent += time.process_time() - cpu - idle
    out['take_cpu_ms_per_image'] = 1e3 * max(spent, 0.0) / (drains * ready * batch)
  if hasattr(it, 'close'):
    it.close()
  return out


# A TPU generation (`launch.topology`'s names) → its `PEAK_FLOPS` device kind.
_GENERATION_KIND = {
  'v4': 'TPU v4',
  'v5p': 'TPU v5',
  'v5litepod': 'TPU v5 lite',
  'v6e': 'TPU v6 lite',
}
# vCPUs of a v5e TPU VM by its chips (Cloud TPU v5e docs, "VM types": ct5lp-hightpu-1t/4t/8t).
_V5E_HOST_VCPUS = {1: 24, 4: 112, 8: 224}


def host_need(config: mlc.ConfigDict, accelerator: str, mfu: float) -> dict[str, Any]:
  """The images/s one host of a TPU slice (`accelerator`, e.g. 'v5litepod-8') consumes when its
  chips run the config's train step at `mfu` of their dense bf16 peak, and at 100 % (the most
  any step could ask), from the analytic FLOPs per image."""
  from triplane3d.launch import topology

  if not 0 < mfu <= 1:
    raise ValueError(f'--mfu must be in (0, 1], got {mfu}.')
  tpu = topology.parse(accelerator)
  peak = dict(PEAK_FLOPS)[_GENERATION_KIND[tpu.generation]] * tpu.chips_per_host
  per_image = analytic_flops(config)['train']
  vcpus = _V5E_HOST_VCPUS.get(tpu.chips_per_host) if tpu.generation == 'v5litepod' else None
  return {
    'accelerator': tpu.accelerator,
    'chips_per_host': tpu.chips_per_host,
    'host_vcpus': vcpus,
    'mfu': mfu,
    'images_per_s': mfu * peak / per_image,
    'images_per_s_at_100pct_mfu': peak / per_image,
  }


def data_benchmark(
  config: mlc.ConfigDict,
  *,
  workers: list[int],
  steps: int,
  float_pixels: bool = False,
  accelerator: str = '',
  mfu: float = 0.4,
) -> dict[str, Any]:
  """The input pipeline alone, per host: images/s and the consuming process's CPU time per
  image for each worker count; the CPU time per image of the decoding itself (the 0-worker
  run); with `accelerator`, the rate a host of that slice needs (`host_need`) and the cores
  that takes. A synthetic source without a data_dir or workdir is generated into a temporary
  directory. `float_pixels=False` (default) times the trainer's uint8 wire format."""
  from triplane3d.data import pipeline

  config = config.copy_and_resolve_references()
  with tempfile.TemporaryDirectory() as tmp:
    if config.data.source == 'synthetic' and not (config.data.data_dir or config.workdir):
      config.data.data_dir = tmp
    data = pipeline.prepare(config)
    runs = {}
    for w in workers:
      config.data.num_workers = w
      runs[str(w)] = pipeline_rate(config, data, steps, float_pixels=float_pixels)
  result = {
    'mode': 'data',
    'source': config.data.source,
    'batch_per_host': config.train.batch_size,
    'image_size': config.model.img_size,
    'render_resolution': config.render.resolution,
    'pixels': 'float32' if float_pixels else 'uint8',
    'images_per_s_per_host': {w: r['images_per_s'] for w, r in runs.items()},
    'main_cpu_ms_per_image': {w: r['main_cpu_ms_per_image'] for w, r in runs.items()},
    'take_cpu_ms_per_image': {
      w: r['take_cpu_ms_per_image'] for w, r in runs.items() if 'take_cpu_ms_per_image' in r
    },
  }
  if '0' in runs:
    result['decode_cpu_ms_per_image'] = runs['0']['main_cpu_ms_per_image']
  if accelerator:
    need = host_need(config, accelerator, mfu)
    result['host_need'] = need
    if '0' in runs:
      ms = result['decode_cpu_ms_per_image']
      result['decode_cores_needed'] = need['images_per_s'] * ms / 1e3
      result['decode_cores_needed_at_100pct_mfu'] = need['images_per_s_at_100pct_mfu'] * ms / 1e3
    takes = result['take_cpu_ms_per_image']
    take = takes[max(takes, key=int)] if takes else 0.0  # With the most workers timed.
    if take > 0:  # The consuming process's cap.
      result['main_process_max_images_per_s'] = 1e3 / take
  return result


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def table(result: dict[str, Any]) -> str:
  """The readable report: one `name  value` line per scalar (lists and parts left out)."""
  lines = []
  for k, v in result.items():
    if isinstance(v, dict) and k == 'images_per_s_per_host':
      lines += [f'{"images/s/host, " + w + " workers":<34} {r:.1f}' for w, r in v.items()]
    elif isinstance(v, dict) and k in ('main_cpu_ms_per_image', 'take_cpu_ms_per_image'):
      what = k.split('_cpu')[0]
      lines += [f'{what + " CPU ms/image, " + w + " workers":<34} {r:.3f}' for w, r in v.items()]
    elif isinstance(v, dict) and k == 'host_need':
      lines += [f'{"host need: " + a:<34} {_fmt(b)}' for a, b in v.items()]
    elif isinstance(v, dict) and k in ('flops_per_image_analytic_parts', 'memory_analysis'):
      lines.append(f'{k:<34} ' + ', '.join(f'{a} {_fmt(float(b))}' for a, b in v.items()))
    elif isinstance(v, dict) and k == 'device_time':
      lines += [
        f'{"profile: " + a:<34} {_fmt(b)}' for a, b in v.items() if not isinstance(b, list | dict)
      ]
      parts = v.get('by_part_s_per_step', {}).items()
      lines.append(
        f'{"profile: s/step by part":<34} ' + ', '.join(f'{a} {b:.4g}' for a, b in parts)
      )
      runs = 'runs' if v.get('source') == 'host threads' else 'kernels'  # XLA:CPU's thunks.
      scopes = v.get('top_op_scopes', {})
      lines += [
        f'{"profile: op " + o:<34} {c}, {n:.4g} {runs}, {t:.4g} s  {scopes.get(o, "")}'.rstrip()
        for o, c, n, t in v.get('top_ops', [])[:10]
      ]
    elif not isinstance(v, list | dict):
      lines.append(f'{k:<34} {_fmt(v)}')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  from absl import flags
  from ml_collections import config_flags

  from triplane3d import console

  del argv
  console.quiet_libraries()
  f = flags.FLAGS
  config = f.config
  if f.mode == 'data':
    result = data_benchmark(
      config,
      workers=[int(w) for w in f.workers],
      steps=f.steps,
      float_pixels=f.float_pixels,
      accelerator=f.accelerator,
      mfu=f.mfu,
    )
  else:
    result = step_benchmark(
      config,
      steps=f.steps,
      warmup=f.warmup,
      peak=f.peak_flops,
      profile=f.profile,
      profile_steps=f.profile_steps,
    )
  result['config'] = config_flags.get_config_filename(f['config'])
  result['overrides'] = config_flags.get_override_values(f['config'])
  print(table(result))
  if f.json:
    with open(f.json, 'w') as fp:
      json.dump(result, fp, indent=1)


def _define_flags() -> None:

  from absl import flags

  from triplane3d import run_config

  demo = run_config.config_file('demo.py')
  run_config.define_config_flag(demo, 'Experiment config file.')
  flags.DEFINE_enum('mode', 'step', ['step', 'data'], 'Time the train step or the pipeline.')
  flags.DEFINE_integer('steps', 10, 'Timed steps (batches in --mode=data).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_float('peak_flops', None, 'Peak FLOP/s per device for MFU (default: table).')
  flags.DEFINE_list('workers', ['0', '2', '4'], '--mode=data: grain worker counts to time.')
  flags.DEFINE_bool(
    'float_pixels', False, "--mode=data: time float32 pixels, not the trainer's uint8."
  )
  flags.DEFINE_string(
    'accelerator', '', '--mode=data: also the rate one host of this TPU slice needs (v5e-8).'
  )
  flags.DEFINE_float('mfu', 0.4, '--mode=data --accelerator: the MFU that rate assumes.')
  flags.DEFINE_string('json', None, 'Also write the report as JSON here.')
  flags.DEFINE_string('profile', None, 'Trace more steps into this directory and summarise them.')
  flags.DEFINE_integer('profile_steps', 2, '--profile: how many steps to trace.')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
