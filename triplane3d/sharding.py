"""Device mesh, logical-axis rules, the shardings of pytrees, and placing host data on them.

The mesh has two axes, `('data', 'fsdp')`. The batch is split over both (every device sees a
different slice of it); big weights are additionally split over 'fsdp' along their 'embed' (or,
failing that, 'mlp') dimension, so parameters, optimiser state and the teacher each take
1/fsdp of their replicated memory. Everything else is replicated.

Model code names parameter axes logically (`nn.with_logical_partitioning(init, ('embed',
'mlp'))`) and never mentions mesh axes; `RULES` below is the one place that maps the two.
Activations are kept split over the batch by explicit constraints with `batch_sharding(mesh)`
(`Prior3D.act_sharding`): flax's `with_logical_constraint` needs a global mesh, under which
flax also constrains DenseGeneral's flattened kernels during init checks, which fails.

Typical use (shapes: `batch_bhwc` has its leading dim split over data×fsdp):

  mesh = make_mesh(config.mesh)
  check_batch(config.train.batch_size, mesh, jax.process_count())
  abstract = jax.eval_shape(model.init, rng, x)            # nn.Partitioned boxes inside
  param_sh = logical_to_shardings(abstract, mesh)          # NamedSharding per leaf (unboxed)
  abstract_state = jax.eval_shape(make_state, ...)         # {'params', 'opt_state', ...}
  state_sh = state_shardings(abstract_state, param_sh['params'], mesh)
  state = jax.jit(make_state, out_shardings=state_sh)(...)
  step = jax.jit(train_step, in_shardings=(state_sh, batch_sharding(mesh)),
                 out_shardings=(state_sh, replicated(mesh)), donate_argnums=0)
  it = pipeline.create(config, data, block=host_block(mesh, global_batch))
  state, metrics = step(state, to_global(next(it), mesh))   # this host's rows → global batch

`batch_sharding(mesh)` is the one statement of how a batch is split; `host_block` and
`to_global` read it, and `shard_like` places host values (loaded weights) on any shardings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
# The batch dimension of inputs and activations is split over every device.
BATCH_AXES = ('data', 'fsdp')

# Logical axis name -> mesh axis (or axes, or None = replicated). Order is priority: a mesh
# axis is used at most once per array, so for an MLP kernel ('embed', 'mlp') 'embed' takes
# 'fsdp' and 'mlp' stays whole, while a weight without an 'embed' dim falls back to sharding
# 'mlp'. 'act_batch' comes first so activations shard their batch, not their width.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ('act_batch', BATCH_AXES),
  ('embed', 'fsdp'),
  ('mlp', 'fsdp'),
  ('heads', None),
  ('kv', None),
  ('qkv', None),
  ('channels', None),
  ('conv_in', None),
  ('spatial', None),
  ('tokens', None),
)


def make_mesh(mesh_cfg: mlc.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh from `mesh_cfg.data` and `mesh_cfg.fsdp`.

  -1 in one field takes the remaining devices. Impossible configs are refused here, before
  anything is compiled, with a message naming the fields and the device count.

  Axis types are `Auto` on purpose: the trainer jits with explicit in/out shardings and lets
  the compiler propagate shardings through the model (plus batch-sharding constraints).
  `Explicit` axes (jax.make_mesh's default) would put shardings into the types and require
  every op in the model to agree on them, which linen layers do not do.

  Device order comes from `jax.make_mesh`, which knows TPU topologies (ICI rings) and keeps
  each host's devices contiguous on multi-host slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
  where = f'config mesh.data={data}, mesh.fsdp={fsdp} with {n} devices'
  for name, v in (('mesh.data', data), ('mesh.fsdp', fsdp)):
    if v == 0 or v < -1:
      raise ValueError(f'{where}: {name} must be a positive size or -1 (= the rest).')
  if data == -1 and fsdp == -1:
    raise ValueError(
      f'{where}: at most one of mesh.data / mesh.fsdp may be -1; '
      f'e.g. set --config.mesh.fsdp=1 (pure data parallelism).'
    )
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if n % known:
      raise ValueError(
        f'{where}: {n} devices cannot be split into groups of {known}; '
        f'choose a divisor of {n} (one of {_divisors(n)}).'
      )
    data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
  if data * fsdp != n:
    raise ValueError(
      f'{where}: mesh.data × mesh.fsdp = {data * fsdp} must equal the device count {n}; '
      f'e.g. --config.mesh.data=-1 --config.mesh.fsdp={fsdp if n % fsdp == 0 else 1}.'
    )
  return jax.make_mesh(
    (data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def batch_shards(mesh: Mesh) -> int:
  """Number of slices the batch dimension is split into (data × fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, process_count: int) -> None:
  """Refuses a global batch that the mesh or the hosts cannot split evenly."""
  if global_batch < 1:
    raise ValueError(f'train.batch_size must be a positive number of images, got {global_batch}.')
  shards = batch_shards(mesh)
  if global_batch % shards:
    raise ValueError(
      f'train.batch_size={global_batch} is not divisible by mesh data × fsdp = '
      f'{mesh.shape["data"]} × {mesh.shape["fsdp"]} = {shards} (the batch is split over '
      f'both axes); use a multiple of {shards}, e.g. {max(shards, global_batch // shards * shards)}.'
    )
  if global_batch % process_count:
    raise ValueError(
      f'train.batch_size={global_batch} is not divisible by the {process_count} processes '
      f'(each host feeds an equal share); use a multiple of {process_count}.'
    )


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy of the array on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data × fsdp, other dims whole: for inputs (B, ...)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_to_mesh_spec(
  names: Sequence[str | None] | None,
  shape: Sequence[int] | None,
  mesh: Mesh,
  rules: Sequence[tuple[str, Any]] = RULES,
) -> P:
  """Resolves per-dim logical names to a mesh PartitionSpec.

  Same priority semantics as `flax.linen.logical_to_mesh_axes` (rules in order, a mesh axis
  at most once per array), plus one rule of ours: a dim is only sharded if its size is
  divisible by the mesh axes' total size; otherwise that rule is skipped for it (the next
  rule for the same name may still apply) and it ends up replicated. Tiny test models have
  dims like 6 that 4 devices cannot split; replicating them costs memory, never correctness.
  Names not in the rules are replicated. `shape=None` skips the divisibility check.
  """
  if not names:
    return P()
  names = tuple(names)
  # A name may repeat (a conv kernel's two 'spatial' dims) only if it is never sharded.
  sharded = {name for name, axes in rules if axes is not None}
  dups = {n for n in names if isinstance(n, str) and names.count(n) > 1 and n in sharded}
  if dups:
    raise ValueError(f'logical axis names {sorted(dups)} occur more than once in {names}')
  out: list[Any] = [None] * len(names)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    if logical not in names or mesh_axes is None:
      continue
    dim = names.index(logical)
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if out[dim] is not None or used & set(axes):
      continue
    size = math.prod(mesh.shape[a] for a in axes)
    if shape is not None and shape[dim] % size:
      continue
    out[dim] = mesh_axes
    used |= set(axes)
  while out and out[-1] is None:  # P('x', None) == P('x'), but keep specs canonical.
    out.pop()
  return P(*out)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def logical_to_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """NamedSharding for every leaf of a tree carrying logical axis names.

  Accepts (leaves may be mixed):
  - `nn.Partitioned` boxes (what `jax.eval_shape(model.init, ...)` returns for layers built
    with `nn.with_logical_partitioning`): the box is replaced by the sharding, so the result
    has the structure of `nn.unbox(tree)`, i.e. of the params the model actually uses;
  - `PartitionSpec` leaves of logical names (e.g. from `nn.get_partition_spec`): resolved
    without a divisibility check, as the shape is unknown;
  - anything else (arrays, ShapeDtypeStructs, scalars): replicated.
  """

  def one(x):
    if _is_box(x):
      shape = getattr(x.value, 'shape', None)
      return NamedSharding(mesh, logical_to_mesh_spec(x.names, shape, mesh, rules))
    if isinstance(x, P):
      return NamedSharding(mesh, logical_to_mesh_spec(tuple(x), None, mesh, rules))
    return replicated(mesh)

  return jax.tree.map(one, tree, is_leaf=lambda x: _is_box(x) or isinstance(x, P))


def _path(path: Sequence[Any]) -> tuple[str, ...]:
  """A pytree key path as plain names: dict keys, attribute names and sequence indices alike,
  so the same leaf reads the same from a live tree and from orbax metadata."""
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def state_shardings(abstract_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state (params, optimiser state, step, rng, ...).

  optax states mirror the params: Adam's `mu` and `nu` are trees with the params' own paths
  under a prefix (`opt_state[0].mu['Dense_0']['kernel']`). So a state leaf gets the sharding
  of the param whose full path is a suffix of the leaf's path, provided that sharding fits
  the leaf (rank, divisibility: a factored statistic such as Adafactor's `v_row` may be
  smaller than its param); other leaves (step counters, rng keys, Adam's `count`, misfits)
  are replicated. This is exact and
  deterministic, unlike letting the compiler guess shardings for `opt.init`'s outputs.

  `param_shardings` must have the structure of the tree given to `opt.init` (usually the
  `params` collection, unboxed). Leaves of `abstract_state` need `.shape` (arrays or
  ShapeDtypeStructs, e.g. from `jax.eval_shape`); boxed leaves are unboxed first.
  """
  by_path: dict[tuple[Any, ...], NamedSharding] = {}
  for path, sh in jax.tree_util.tree_leaves_with_path(param_shardings):
    by_path[_path(path)] = sh
  lengths = sorted({len(p) for p in by_path}, reverse=True)

  def one(path, leaf):
    key = _path(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for n in lengths:
      if n > len(key):
        continue
      sh = by_path.get(key[len(key) - n :])
      if sh is not None and _fits(sh, shape):
        return sh
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, nn.unbox(abstract_state))


def _fits(sh: NamedSharding, shape: tuple[int, ...]) -> bool:
  """Whether `sh` can shard an array of `shape` (rank fits, every sharded dim divides)."""
  spec = tuple(sh.spec)
  if len(spec) > len(shape):
    return False
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    if dim % math.prod(sh.mesh.shape[a] for a in axes):
      return False
  return True


def shard_like(tree: Any, shardings: Any) -> Any:
  """Host values identical on every process → global jax.Arrays on `shardings`.

  `shardings` has the structure of `tree`, or is one sharding for every leaf. Each process
  fills only its own devices (from its copy), so it works across hosts; e.g. freshly loaded
  checkpoint weights. Inside jit prefer out_shardings.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, sh):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

  return jax.tree.map(put, tree, shardings)


def host_block(mesh: Mesh, global_batch: int) -> int:
  """Which contiguous block of each global batch this process's devices hold.

  `to_global` places a host's rows wherever `batch_sharding(mesh)` puts its devices; reading
  the block off that sharding (rather than assuming block = process index) keeps the global
  batch identical to the single-process one on any device layout.
  """
  rows = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
  rows = [idx[0] for idx in rows]
  lo = min(r.start or 0 for r in rows)
  hi = max(global_batch if r.stop is None else r.stop for r in rows)
  b = global_batch // jax.process_count()
  if hi - lo != b or lo % b:
    raise ValueError(
      f'this process holds batch rows [{lo}, {hi}) of {global_batch}, not one block of {b}; '
      'use a mesh whose batch axes give every process a contiguous share.'
    )
  return lo // b


def to_global(batch: Any, mesh: Mesh) -> Any:
  """Assembles every host's numpy batch into global jax.Arrays on `batch_sharding(mesh)`.

  Args:
    batch: this host's batch, arrays of shape (b, ...) with b = global batch / process_count
      (its `host_block` of the global batch).
    mesh: the device mesh.

  Returns:
    The same tree, as jax.Arrays of shape (b · process_count, ...), sharded on dim 0.
  """
  sh = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), batch)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract values) carrying `shardings`.

  What `Checkpointer.restore_latest` wants: the restored arrays land directly on these
  shardings, without a full copy on any one host.
  """
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), nn.unbox(tree), shardings
  )
