"""Ahead-of-time fit check: does a config's train step fit a TPU chip (or a GPU), how big a batch?

  python -m triplane3d.launch.fit --config=configs/vitb.py --topology=v5e:2x2 \
      [--batch_per_chip=N | --search] [--quick] [--fsdp=N] [--json=PATH] [--config.x=y ...]

Needs the `tpu` extra (libtpu) but no TPU and no dataset: the real step
(`train.jit_train_step` on `train.build`'s shardings, state donated) is lowered with abstract
inputs (`jax.ShapeDtypeStruct`s carrying their shardings) on a mesh over the compile-only devices
of `jax.experimental.topologies.get_topology_desc`, and compiled by libtpu's XLA on this
machine. One device per chip, as Cloud TPU runs them: v4 and v5p as 'megacore' (both
TensorCores of a chip are one device), v5e and v6e have one core per chip. The global batch is
`batch_per_chip × chips`; `--fsdp` sets `mesh.fsdp` (the rest of the chips go to `mesh.data`).

Reported per chip, from `compiled.memory_analysis()`: arguments (state, teacher, batch) +
outputs − aliases (donated state reused for the new state) + temporaries + generated code,
against the chip's HBM (`CHIPS`). A compile that XLA refuses for lack of memory is reported as
not fitting, with the sizes from its message. FLOPs per image: XLA's count with each loop
body counted trip-count times (`benchmark.xla_flops`) beside the analytic count
(`benchmark.analytic_flops`).

`--search` finds the largest power-of-two batch per chip that fits (`search`): quick compiles
walk to it, full ones confirm it (a program that does not fit is refused at buffer assignment,
before the slow code generation). `--quick` (`check(quick=True)`) stops every compile at
buffer assignment: ~10× faster, but its temporaries are an estimate (−28 % to +30 % against
full compiles, docs/performance.md).

Compile time on a 2-core CPU is dominated by libtpu's code generation (~0.1 s per fusion):
~2 min for the demo config, several minutes for ViT-B/14 (docs/performance.md).

GPUs (`--topology=h100:8`, `h200:8`, `a100:8`; `h100:2x8` for 2 hosts of 8): the same step is
compiled by XLA:GPU for that many GPUs (`jax.experimental.topologies.get_topology_desc` with
the GPU's device description, `GPUS`), which needs the CUDA compiler plugin but no GPU: `pip
install -e ".[gpu-aot]"` (jax's CUDA 13 plugin, ptxas and libdevice; no CUDA runtime). The
memory is held against what JAX's allocator takes of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION,
default 75 %), and the report adds the kernels one step launches (`benchmark.kernel_launches`),
what bounds a GPU step of many small kernels. XLA:GPU counts no FLOPs in cuBLAS calls, so the
FLOPs column is XLA:TPU's only. Compiled without autotuning (there is no GPU to time on) and
without Triton GEMM fusions (their tiling search fails without one): the GPU's own compile
picks among cuBLAS and Triton, so memory can differ a little (ViT-B/14 at 64 per H100: 8.69
GiB compiled here, 9.52 GB peak measured on the GPU with the old render.chunk).

Coexisting with other libtpu users: libtpu takes /tmp/libtpu_lockfile for the whole process
when it loads, which would make a training job on this machine (or a second fit check) fail.
`topology_devices` loads it with ALLOW_MULTIPLE_LIBTPU_LOAD=1 (no lockfile taken; compile-only
use opens no chip), TPU_SKIP_MDS_QUERY=1 (no metadata-server queries off Cloud) and
TPU_WORKER_HOSTNAMES=localhost (one host: silences libtpu's warnings). JAX_PLATFORMS=cpu keeps
the runtime backend off any local TPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

# Before jax is imported: this process compiles only; it must not open a local TPU.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax
import ml_collections as mlc

from triplane3d import benchmark, sharding, train

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: HBM per chip and the topology options that make a device a chip."""

  hbm_bytes: int
  megacore: bool


CHIPS = {
  'v4': Chip(32 * GIB, megacore=True),
  'v5e': Chip(16 * GIB, megacore=False),
  'v5p': Chip(95 * GIB, megacore=True),
  'v6e': Chip(32 * GIB, megacore=False),
}


@dataclasses.dataclass(frozen=True)
class Gpu:
  """A GPU as XLA:GPU's compiler sees it (stream_executor.GpuTargetConfigProto's device info:
  the facts its fusion and tiling heuristics read) and its memory."""

  name: str
  memory_bytes: int
  sms: int
  compute_capability: tuple[int, int]
  accelerated: bool  # sm_90a-style architecture-specific features.
  fpus_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  l2_bytes: int
  bandwidth: float  # Bytes/s.
  clock_ghz: float

  def target_config(self) -> str:
    """The text proto that `get_topology_desc(..., target_config=)` takes."""
    major, minor = self.compute_capability
    feature = 'ACCELERATED_FEATURES' if self.accelerated else 'NONE'
    info = {
      'threads_per_block_limit': 1024,
      'threads_per_warp': 32,
      'shared_memory_per_block': 49152,
      'shared_memory_per_core': self.shared_memory_per_sm,
      'threads_per_core_limit': 2048,
      'core_count': self.sms,
      'fpus_per_core': self.fpus_per_sm,
      'block_dim_limit_x': 2**31 - 1,
      'block_dim_limit_y': 65535,
      'block_dim_limit_z': 65535,
      'memory_bandwidth': int(self.bandwidth),
      'l2_cache_size': self.l2_bytes,
      'clock_rate_ghz': self.clock_ghz,
      'device_memory_size': self.memory_bytes,
      'shared_memory_per_block_optin': self.shared_memory_per_block_optin,
      'registers_per_core_limit': 65536,
      'registers_per_block_limit': 65536,
      'thread_dim_limit_x': 1024,
      'thread_dim_limit_y': 1024,
      'thread_dim_limit_z': 64,
    }
    lines = [f'  {k}: {v}' for k, v in info.items()]
    lines.append(
      f'  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {feature} }}'
    )
    return (
      'gpu_device_info {\n' + '\n'.join(lines) + '\n}\nplatform_name: "CUDA"\n'
      'dnn_version_info { major: 9 minor: 10 patch: 0 }\n'
      f'device_description_str: "{self.name}"\n'
    )


# SXM parts, as XLA's own GPU specs describe them (xla/backends/gpu/target_config/specs).
GPUS = {
  'h100': Gpu('NVIDIA H100 80GB HBM3', 84942979072, 132, (9, 0), True, 128, 233472, 232448,
              50 * 2**20, 3.35232e12, 1.98),
  'h200': Gpu('NVIDIA H200 141GB HBM3e', 151397597184, 132, (9, 0), True, 128, 233472,
              232448, 50 * 2**20, 4.8e12, 1.98),
  'a100': Gpu('NVIDIA A100-SXM4-80GB', 85100068864, 108, (8, 0), False, 64, 167936, 166912,
              40 * 2**20, 2.03904e12, 1.41),
}  # fmt: skip


def gpu_of(topology: str) -> Gpu | None:
  """The `Gpu` of a GPU topology name ('h100:8', 'h200:2x8'), None for a TPU one."""
  return GPUS.get(topology.split(':')[0])


def _gpu_layout(topology: str) -> tuple[int, int]:
  """(hosts, GPUs per host) of 'h100:8' (one host) or 'h100:2x8'."""
  shape = topology.split(':', 1)[1] if ':' in topology else ''
  parts = shape.split('x')
  if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(
      f"--topology={topology!r}: expected GPU:COUNT or GPU:HOSTSxCOUNT, e.g. 'h100:8' (one "
      "host of 8) or 'h100:2x8' (2 hosts of 8)."
    )
  return (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION,
  default 0.75); with XLA_PYTHON_CLIENT_PREALLOCATE=false it grows to the whole GPU."""
  if os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', '').lower() in ('false', '0'):
    return 1.0
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75'))


# libtpu's environment for compile-only use next to other libtpu processes (module docstring).
_LIBTPU_ENV = {
  'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
  'TPU_SKIP_MDS_QUERY': '1',
  'TPU_WORKER_HOSTNAMES': 'localhost',
}


def chip_of(topology: str) -> Chip:
  """The `Chip` of a topology name like 'v5e:2x2' or 'v4:2x2x1'."""
  gen = topology.split(':')[0]
  if gen not in CHIPS or ':' not in topology:
    raise ValueError(
      f'--topology={topology!r}: expected GENERATION:SHAPE with GENERATION one of '
      f"{sorted(CHIPS)}, e.g. 'v5e:2x2', 'v4:2x2x1', 'v5p:2x2x1', 'v6e:2x4'; or GPU:COUNT "
      f"with GPU one of {sorted(GPUS)}, e.g. 'h100:8', 'h100:2x8'."
    )
  return CHIPS[gen]


def topology_devices(topology: str) -> list[jax.Device]:
  """Compile-only devices of a TPU topology, one per chip (needs libtpu, no TPU), or of a
  GPU topology, one per GPU (needs the CUDA plugin, no GPU)."""
  from jax.experimental import topologies

  gpu = gpu_of(topology)
  if gpu is not None:
    hosts, per_host = _gpu_layout(topology)
    try:
      desc = topologies.get_topology_desc(
        platform='cuda',
        topology=f'1x{hosts}x{per_host}',
        target_config=gpu.target_config(),
      )
    except (RuntimeError, NotImplementedError) as e:
      # Without the plugin jax knows no 'cuda' platform to make a topology for.
      if 'not implemented for cuda' in str(e) or 'unknown backend' in str(e).lower():
        raise RuntimeError(
          f'the fit check for {topology} needs the CUDA compiler plugin (no GPU): '
          'pip install -e ".[gpu-aot]" (or ".[dev]").'
        ) from e
      raise
    return list(desc.devices)
  chip = chip_of(topology)
  saved = {k: os.environ.get(k) for k in _LIBTPU_ENV}
  os.environ.update(_LIBTPU_ENV)  # Read when libtpu loads (the first call).
  try:
    kwargs = {'chip_config_name': 'megacore'} if chip.megacore else {}
    return list(topologies.get_topology_desc(topology, 'tpu', **kwargs).devices)
  except RuntimeError as e:
    if 'TPU support not installed' in str(e):
      raise RuntimeError(
        'the fit check needs libtpu: pip install -e ".[tpu]" (or ".[dev]").'
      ) from e
    raise
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@dataclasses.dataclass
class Fit:
  """One compile's report; sizes are bytes per chip, FLOPs per image."""

  topology: str
  chips: int
  batch_per_chip: int
  fsdp: int
  hbm_bytes: int
  fits: bool
  total: int
  arguments: int = 0
  outputs: int = 0
  aliases: int = 0
  temporaries: int = 0
  code: int = 0
  xla_flops_per_image: float = 0.0
  xla_flops_per_image_loops_once: float = 0.0
  analytic_flops_per_image: float = 0.0
  unknown_trip_loops: int = 0
  kernel_launches: int = 0  # Per step and device, on GPUs (`benchmark.kernel_launches`).
  compile_s: float = 0.0
  error: str = ''
  quick: bool = False  # An estimate without code generation (`check`).


def _config_for(config: mlc.ConfigDict, chips: int, batch_per_chip: int, fsdp: int | None):
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch_per_chip * chips
  if fsdp is not None:
    config.mesh.fsdp, config.mesh.data = fsdp, -1
  return config


def abstract_inputs(setup: train.Setup, config: mlc.ConfigDict) -> tuple[Any, Any, Any]:
  """(state, teacher, batch) as ShapeDtypeStructs with the step's input shardings."""
  state = sharding.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
  teacher = state['params']['backbone'] if setup.use_teacher else {}
  teacher = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    teacher,
    setup.teacher_shardings,
  )
  batch_sh = sharding.batch_sharding(setup.mesh)
  batch = {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
    for k, (shape, dtype) in benchmark.batch_shapes(config).items()
  }
  return state, teacher, batch


def check(
  config: mlc.ConfigDict,
  topology: str,
  batch_per_chip: int,
  fsdp: int | None = None,
  *,
  quick: bool = False,
) -> Fit:
  """Compiles the train step for `topology` at `batch_per_chip` and reports its fit.

  `quick`: tell XLA the chip has 1 MiB of HBM (`xla_tpu_max_hbm_size_mib`), so that it stops
  after buffer assignment, before code generation (~10× faster), naming the peak of the
  temporaries; the total is then arguments + that peak (no code, no FLOPs). It runs the same
  passes up to that point, but the temporaries it names come out ~10 % below a full
  compile's (docs/performance.md): an estimate, marked `quick` in the report.
  """
  gpu = gpu_of(topology)
  if gpu is not None and quick:
    raise ValueError('--quick stops libtpu at buffer assignment: TPU topologies only.')
  devices = topology_devices(topology)
  capacity = gpu.memory_bytes * gpu_memory_fraction() if gpu else chip_of(topology).hbm_bytes
  config = _config_for(config, len(devices), batch_per_chip, fsdp)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.train.batch_size, mesh, 1)
  # An explicit step count: the schedule needs one, and counting epochs would open the data.
  setup = train.build(config, mesh, num_steps=max(config.train.num_steps, 1))
  step = train.jit_train_step(setup, config, jax.random.key(config.seed))
  inputs = abstract_inputs(setup, config)
  report = Fit(
    topology=topology,
    chips=len(devices),
    batch_per_chip=batch_per_chip,
    fsdp=mesh.shape['fsdp'],
    hbm_bytes=int(capacity),
    fits=False,
    total=0,
    analytic_flops_per_image=benchmark.analytic_flops(config)['train'],
    quick=quick,
  )
  start = time.perf_counter()
  try:
    lowered = step.lower(*inputs)
    options = {'xla_tpu_max_hbm_size_mib': 1} if quick else None
    if gpu is not None:  # No GPU to autotune on; Triton's GEMM tiling fails without one.
      options = {'xla_gpu_enable_triton_gemm': False}
    compiled = lowered.compile(options)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    report.compile_s = time.perf_counter() - start
    report.temporaries, _ = _needed_bytes(str(e))
    report.arguments = _shard_bytes(inputs)
    report.total = report.arguments + report.temporaries
    report.fits = quick and report.total <= capacity
    if not quick:
      report.error = str(e).split('\n')[0][:500]
    return report
  if quick:
    raise RuntimeError(f'{topology}: XLA did not enforce xla_tpu_max_hbm_size_mib=1.')
  report.compile_s = time.perf_counter() - start
  memory = benchmark.memory_bytes(compiled)
  for k, v in memory.items():
    setattr(report, k, v)
  report.fits = memory['total'] <= capacity
  if gpu is not None:  # XLA:GPU counts no FLOPs in cuBLAS calls: no FLOPs column.
    report.kernel_launches = benchmark.kernel_launches(compiled)['total']
    return report
  xla = benchmark.xla_flops(compiled)
  per_image = len(devices) / config.train.batch_size
  report.xla_flops_per_image = xla['with_trips'] * per_image
  report.xla_flops_per_image_loops_once = xla['once'] * per_image
  report.unknown_trip_loops = xla['unknown_trips']
  return report


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}  # XLA prints binary units.
_OOM = (  # XLA's out-of-memory messages: the size asked for, then the HBM available.
  re.compile(r'temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)'),
  re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm'),
)


def _needed_bytes(message: str) -> tuple[int, int]:
  """(bytes the program asked for, bytes XLA had) from an out-of-memory error; 0s if
  unreadable."""
  for pattern in _OOM:
    m = pattern.search(message)
    if m:
      need, unit, have, have_unit = m.groups()
      return int(float(need) * _UNITS[unit]), int(float(have) * _UNITS[have_unit])
  return 0, 0


def search(
  config: mlc.ConfigDict,
  topology: str,
  fsdp: int | None = None,
  *,
  start: int = 8,
  quick: bool = False,
  log=print,
) -> tuple[int, float, list[Fit]]:
  """(largest power-of-two batch per chip that fits, the memory line's largest batch, every
  compile's `Fit` in order).

  First with quick compiles (`check(quick=True)`, no code generation). Memory is affine in
  the batch, `fixed + per_image · b`: a compile at `start` bounds per_image by its
  temporaries / start (some temporaries do not grow with the batch, so this under-estimates
  the batch that fits); the largest power of two under that bound is compiled next, and the
  line through the two points is the estimate. Then the walk: up by doubling while the next
  power of two fits, down by halving while it does not. Unless `quick`, full compiles then
  confirm from the quick answer, walking the same way: typically one full compile that fits
  and one that does not (XLA refuses that one at buffer assignment, before code generation).
  """
  done: dict[tuple[int, bool], Fit] = {}

  def at(b: int, fast: bool) -> Fit:
    if (b, fast) not in done:
      done[b, fast] = check(config, topology, b, fsdp, quick=fast)
      log(_row(done[b, fast]))
    return done[b, fast]

  def walk(b: int, fast: bool) -> int:
    while at(b, fast).fits and at(2 * b, fast).fits:
      b *= 2
    while b > 1 and not at(b, fast).fits:
      b //= 2
    return b if at(b, fast).fits else 0

  fast = gpu_of(topology) is None  # GPUs have no quick compile: every compile is full.
  first = at(start, fast)
  estimate = 0.0
  b = start
  if first.fits:
    room = first.hbm_bytes - (first.total - first.temporaries)
    b = max(start, 2 ** int(math.log2(max(start * room / max(first.temporaries, 1), 1))))
    if at(b, fast).fits and b > start:  # Two points: the line.
      per_image = (done[b, fast].total - first.total) / (b - start)
      fixed = first.total - start * per_image
      estimate = (first.hbm_bytes - fixed) / per_image if per_image > 0 else math.inf
  b = walk(b, fast)
  if fast and not quick and b:
    b = walk(b, False)
  return b, estimate, list(done.values())


def _row(f: Fit) -> str:
  """One compile as a table row."""
  kind = 'quick' if f.quick else 'full'
  used = f'{f.total / GIB:6.2f} of {f.hbm_bytes / GIB:.0f} GiB'
  row = (
    f'{f.topology:<10} fsdp {f.fsdp:<2} batch/chip {f.batch_per_chip:>5} {kind:<5} {used}  '
    f'{"fits" if f.fits else "DOES NOT FIT":<12}  temporaries {f.temporaries / GIB:6.2f} GiB  '
    f'args {f.arguments / GIB:5.2f} GiB  '
  )
  if f.xla_flops_per_image:
    ratio = f.xla_flops_per_image / f.analytic_flops_per_image
    row += (
      f'code {f.code / 2**20:5.1f} MiB  GFLOP/image XLA {f.xla_flops_per_image / 1e9:.2f}, '
      f'analytic {f.analytic_flops_per_image / 1e9:.2f} ({ratio:.2f}x)  '
    )
  if f.kernel_launches:
    row += f'kernels/step {f.kernel_launches}  '
  return row + f'compile {f.compile_s:.0f} s'


def main(argv: list[str]) -> None:
  from absl import flags
  from ml_collections import config_flags

  del argv
  f = flags.FLAGS
  config = f.config
  result: dict[str, Any] = {
    'config': config_flags.get_config_filename(f['config']),
    'overrides': config_flags.get_override_values(f['config']),
    'topology': f.topology,
  }
  if f.search:
    best, estimate, reports = search(config, f.topology, f.fsdp, quick=f.quick)
    print(f'largest power-of-two batch per chip that fits: {best} (memory line: {estimate:.0f})')
    result.update(largest_batch_per_chip=best, line_estimate=estimate)
  else:
    reports = [check(config, f.topology, f.batch_per_chip, f.fsdp, quick=f.quick)]
    print(_row(reports[0]))
    if reports[0].error:
      print(reports[0].error)
  result['compiles'] = [dataclasses.asdict(r) for r in reports]
  if f.json:
    with open(f.json, 'w') as fp:
      json.dump(result, fp, indent=1)


def _define_flags() -> None:
  from absl import flags

  from triplane3d import run_config

  vitb = run_config.config_file('vitb.py')
  run_config.define_config_flag(vitb, 'Experiment config file.')
  flags.DEFINE_string(
    'topology', 'v5e:2x2', 'TPU topology (v5e:2x2, v4:2x2x1, v6e:2x4) or GPUs (h100:8, h100:2x8).'
  )
  flags.DEFINE_integer('batch_per_chip', 8, 'Images per chip (global batch = this × chips).')
  flags.DEFINE_bool('search', False, 'Find the largest power-of-two batch per chip that fits.')
  flags.DEFINE_bool('quick', False, 'Estimate without code generation (check(quick=True)).')
  flags.DEFINE_integer('fsdp', None, 'mesh.fsdp (default: the config); mesh.data takes the rest.')
  flags.DEFINE_string('json', None, 'Also write the report as JSON here.')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
