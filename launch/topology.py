"""TPU slice shapes: what an accelerator type name means in chips, hosts and topology.

One owner for the facts every launcher needs (Cloud TPU docs, "TPU versions" / "Supported
configurations" pages, and the GKE TPU tables):

  v4-N, v5p-N         N counts TensorCores: 2 per chip, so v4-32 = 16 chips. 4 chips per host
                      (v4-8 is one host); 3D topologies (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...).
  v5litepod-N, v6e-N  N counts chips (1 TensorCore each). Up to 8 chips on one host (the 8-chip
                      VM); larger slices have 4 chips per host, so v5litepod-16 = 4 hosts.
                      2D topologies (1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16). `v5e-N` is
                      accepted as a spelling of `v5litepod-N`.

`parse('v5litepod-16')` returns a `Slice` (hosts, chips per host, topology, the TPU VM runtime
version, the GKE node labels and machine type). Only power-of-two sizes are known here; a
bad name raises `LaunchError` naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import re

from triplane3d.launch.shell import LaunchError


@dataclasses.dataclass(frozen=True)
class _Generation:
  prefix: str  # The accelerator-type prefix gcloud uses.
  cores_per_chip: int  # 2 where N counts TensorCores (v4, v5p), 1 where it counts chips.
  runtime_version: str  # TPU VM software version for JAX (Cloud TPU "TPU software versions").
  gke_accelerator: str  # Value of the node label cloud.google.com/gke-tpu-accelerator.
  machine_type: str  # GKE machine type; '{chips}' is filled with the chips per host.
  chip_counts: tuple[int, ...]  # Slice sizes in chips.


_GENERATIONS = {
  'v4': _Generation(
    'v4', 2, 'tpu-ubuntu2204-base', 'tpu-v4-podslice', 'ct4p-hightpu-4t',
    tuple(2**k for k in range(2, 12)),  # 4 .. 2048 chips: v4-8 .. v4-4096.
  ),
  'v5p': _Generation(
    'v5p', 2, 'v2-alpha-tpuv5', 'tpu-v5p-slice', 'ct5p-hightpu-4t',
    tuple(2**k for k in range(2, 13)),  # 4 .. 4096 chips: v5p-8 .. v5p-8192.
  ),
  'v5litepod': _Generation(
    'v5litepod', 1, 'v2-alpha-tpuv5-lite', 'tpu-v5-lite-podslice', 'ct5lp-hightpu-{chips}t',
    (1, 4, 8, 16, 32, 64, 128, 256),
  ),
  'v6e': _Generation(
    'v6e', 1, 'v2-alpha-tpuv6e', 'tpu-v6e-slice', 'ct6e-standard-{chips}t',
    (1, 4, 8, 16, 32, 64, 128, 256),
  ),
}  # fmt: skip
_ALIASES = {'v5e': 'v5litepod'}
_TOPOLOGY_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
                256: '16x16'}  # fmt: skip
_USAGE = (
  'use v4-N or v5p-N (N = TensorCores = 2 x chips, e.g. v4-32 = 16 chips), v5litepod-N '
  '(or v5e-N) or v6e-N (N = chips), e.g. --accelerator=v5litepod-16'
)


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice: `hosts` VMs (workers) with `chips_per_host` chips each."""

  accelerator: str  # Canonical gcloud name, e.g. 'v5litepod-16'.
  generation: str  # 'v4', 'v5p', 'v5litepod' or 'v6e'.
  chips: int
  hosts: int
  chips_per_host: int
  topology: str  # e.g. '4x4' or '2x2x4' (the GKE node label cloud.google.com/gke-tpu-topology).
  runtime_version: str
  gke_accelerator: str
  machine_type: str

  def describe(self) -> str:
    return (
      f'{self.accelerator}: {self.chips} chips on {self.hosts} host(s), {self.chips_per_host} '
      f'per host, topology {self.topology}, runtime {self.runtime_version}'
    )


def _topology_3d(chips: int) -> str:
  # Doubling the smallest axis (the last of equals) from 2x2x1 gives Google's shapes:
  # 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...
  dims = [2, 2, 1]
  while dims[0] * dims[1] * dims[2] < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return 'x'.join(map(str, dims))


def parse(accelerator: str) -> Slice:
  """The slice an accelerator type names, e.g. 'v4-32' -> 16 chips on 4 hosts, 2x2x4."""
  match = re.fullmatch(r'(v4|v5p|v5litepod|v5e|v6e)-(\d+)', (accelerator or '').strip().lower())
  if not match:
    raise LaunchError(f'--accelerator={accelerator!r} is not a known TPU type: {_USAGE}.')
  name, n = _ALIASES.get(match[1], match[1]), int(match[2])
  gen = _GENERATIONS[name]
  chips = n // gen.cores_per_chip
  if n % gen.cores_per_chip or chips not in gen.chip_counts:
    sizes = ', '.join(f'{name}-{c * gen.cores_per_chip}' for c in gen.chip_counts)
    raise LaunchError(f'--accelerator={accelerator!r}: {name} slices come as {sizes}.')
  if gen.cores_per_chip == 2:
    hosts, per_host, topology = chips // 4, 4, _topology_3d(chips)
  else:
    # Slices of up to 8 chips are one VM; larger ones are built from 4-chip VMs.
    per_host = chips if chips <= 8 else 4
    hosts, topology = chips // per_host, _TOPOLOGY_2D[chips]
  return Slice(
    accelerator=f'{name}-{n}',
    generation=name,
    chips=chips,
    hosts=hosts,
    chips_per_host=per_host,
    topology=topology,
    runtime_version=gen.runtime_version,
    gke_accelerator=gen.gke_accelerator,
    machine_type=gen.machine_type.format(chips=per_host),
  )
