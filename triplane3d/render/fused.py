"""The triplane lookup and the point MLP as one Pallas (Triton) kernel, for GPUs.

`render.lookup='pallas'` renders with `fused_logits` in place of `sample_planes_mean` followed
by the point MLP's two matmuls. The unfused program writes each point's (C,) mean feature and
(F,) hidden activations to memory and reads them back (on an H100 the point-MLP GEMM fusions
were 101 ms of a 592 ms ViT-B/14 step, memory-bound: docs/performance.md); here a block of
points is gathered, averaged and decoded in registers and only its 4 logits are written.

Forward, per block of `block` points: the 12 bilinear taps (4 per plane, `grid_sample` with
zeros padding and align_corners=False, as planes.py) are gathered from the flattened
(3·H·W, C) planes and averaged → feats (block, C); h = softplus(feats @ W1 + b1);
logits = h @ W2 + b2 → (block, 4), as `models.triplane.point_mlp` computes them before its
sigmoid.

Backward (its own kernel): the block's feats and hidden activations are recomputed, then
d_feats = (dlogits @ W2ᵀ · sigmoid(pre)) @ W1ᵀ is written per point, and W1's, b1's and W2's
gradients per block (summed over blocks outside). d_feats goes into the planes with the same
scatter as the unfused lookup's backward (`planes.scatter_taps`, 'auto': one fused scatter on
GPUs, a loop over the taps elsewhere): Triton's atomic adds could do
it in the kernel, but Pallas' interpret mode, in which the tests check this kernel on a CPU,
does not accumulate repeated indices within one store, so the kernel would go untested.

Everything computes in float32 (bfloat16 planes are widened as they are gathered); `precision`
is that of the kernel's matmuls (at the default, None,
Triton uses TF32 on GPUs; the tests ask for 'highest'). Gradients flow to the planes and the
MLP weights; the point positions get none (as `sample_planes_mean`).

The tests run it in Pallas' interpret mode on the CPU against float64 references and the
unfused renderer, and compile it for an H100 through the CUDA plugin (no GPU). On an H100
(session 18) it computes the same values as 'xla' (TF32 aside) but is 4.6× slower: 48 ms
against 10.6 ms for the lookup + MLP, forward and backward, at 4.2 M points
(benchmarks/lookup_mlp.py). So it is opt-in, kept for its memory (a third of XLA's
temporaries) and as the starting point of a faster kernel; docs/performance.md has the
numbers ("The lookup and the point MLP in one kernel", "The second H100 session").
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from triplane3d.render.planes import PLANE_AXES, bilinear_taps, plane_coords, scatter_taps

LOOKUPS = ('xla', 'pallas')


def point_outputs(logits_n4: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The point MLP's (n, 4) logits → `(rgb (n, 3), raw_sigma (n, 1))`: rgb = sigmoid(x)·(1 +
  2·0.001) − 0.001 (EG3D's margin); the raw density is activated later, in the marcher."""
  return jax.nn.sigmoid(logits_n4[:, 1:]) * (1 + 2 * 0.001) - 0.001, logits_n4[:, :1]


def _softplus_and_sigmoid(x):
  """(softplus(x), sigmoid(x)) from one exp(−|x|) (marching.softplus' formula)."""
  e = jnp.exp(-jnp.abs(x))
  soft = jnp.maximum(x, 0.0) + jnp.log1p(e)
  sig = jnp.where(x >= 0, 1.0, e) / (1.0 + e)
  return soft, sig


def _feats(coord_refs, flat_ref, h: int, w: int, rows=slice(None)):
  """Mean of the 12 bilinear taps of the points `rows` of a block: → (rows, C). `coord_refs`:
  6 refs of the block's plane coordinates, plane p's (width, height) at 2p, 2p + 1."""
  acc = None
  for p in range(3):
    gx = coord_refs[2 * p][rows]
    gy = coord_refs[2 * p + 1][rows]
    for index, weight in bilinear_taps(gx, gy, h, w):
      row = p * h * w + index
      tap = (weight * (1.0 / 3.0))[:, None] * flat_ref[row, :].astype(jnp.float32)
      acc = tap if acc is None else acc + tap
  return acc


def _hidden(feats, w1_ref, b1_ref, precision):
  pre = pltriton.dot(feats, w1_ref[...], precision=precision) + b1_ref[...][None, :]
  return pre, *_softplus_and_sigmoid(pre)


def _forward_kernel(*refs, h, w, precision):
  coord_refs, (flat_ref, w1_ref, b1_ref, w2t_ref, b2_ref), out_refs = (
    refs[:6],
    refs[6:11],
    refs[11:],
  )
  feats = _feats(coord_refs, flat_ref, h, w)
  _, hid, _ = _hidden(feats, w1_ref, b1_ref, precision)
  for j in range(4):  # Four (block,) outputs: Triton's dot needs ≥ 16 output columns.
    out_refs[j][...] = jnp.sum(hid * w2t_ref[j, :][None, :], axis=1) + b2_ref[j]


def _backward_kernel(*refs, h, w, block, steps, precision):
  """`steps` sub-blocks of `block` points, one after another: the weight gradients are summed
  in registers, so only one partial per `block · steps` points is written (and a small block
  keeps Triton's compile and registers in bounds: ~75 s to compile at 256 points, 11 at 64)."""
  coord_refs, g_refs = refs[:6], refs[6:10]
  flat_ref, w1_ref, w1t_ref, b1_ref, w2t_ref = refs[10:15]
  dfeat_ref, dw1_ref, db1_ref, dw2t_ref = refs[15:]
  c, f = w1_ref.shape

  def sub_block(s, acc):
    dw1, db1, dw2t = acc
    rows = pl.ds(pl.multiple_of(s * block, block), block)
    feats = _feats(coord_refs, flat_ref, h, w, rows)
    _, hid, sig = _hidden(feats, w1_ref, b1_ref, precision)
    dhid = None
    new_dw2t = []
    for j in range(4):
      g = g_refs[j][rows]
      new_dw2t.append(dw2t[j] + jnp.sum(g[:, None] * hid, axis=0))
      term = g[:, None] * w2t_ref[j, :][None, :]
      dhid = term if dhid is None else dhid + term
    dpre = dhid * sig
    dfeat_ref[rows, :] = pltriton.dot(dpre, w1t_ref[...], precision=precision)
    dw1 = dw1 + pltriton.dot(feats, dpre, trans_a=True, precision=precision)
    return dw1, db1 + jnp.sum(dpre, axis=0), tuple(new_dw2t)

  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
  init = (zeros(c, f), zeros(f), tuple(zeros(f) for _ in range(4)))
  dw1, db1, dw2t = jax.lax.fori_loop(0, steps, sub_block, init)
  dw1_ref[...] = dw1
  db1_ref[...] = db1
  for j in range(4):
    dw2t_ref[j, :] = dw2t[j]


def _call(kernel, interpret: bool | None, *args, **call_kwargs):
  """`pl.pallas_call(kernel, ...)(*args)`: compiled by Triton on GPUs, interpreted elsewhere
  (`interpret=None`: chosen per lowering platform, so a CPU can compile the GPU program), or
  as `interpret` says."""

  def call(interpret):
    return lambda *a: pl.pallas_call(
      kernel,
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      **call_kwargs,
    )(*a)

  if interpret is not None:
    return call(interpret)(*args)
  gpu = call(False)
  return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, default=call(True))


def _specs(block: int, n_coords: int, *full):
  """Blocked (block,) specs for `n_coords` per-point arrays, then whole-array specs."""
  per_point = [pl.BlockSpec((block,), lambda i: (i,)) for _ in range(n_coords)]
  return per_point + [_whole(shape) for shape in full]


def _whole(shape):
  return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _coords6(coords_np2):
  return [coords_np2[:, p, k] for p in range(3) for k in range(2)]


# Points per backward sub-block, and sub-blocks per program (`_backward_kernel`).
_BWD_BLOCK = 64
_BWD_STEPS = 16


def _pad(n: int, block: int) -> int:
  return -(-n // block) * block - n


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _logits(planes, coords_np2, mlp, block, precision, interpret):
  """(n, 4) logits; `coords_np2` (n, 3, 2) with n a multiple of `block` and of the backward's
  `_BWD_BLOCK · _BWD_STEPS` points per program."""
  _, h, w, c = planes.shape
  n = coords_np2.shape[0]
  w1, b1, w2, b2 = mlp
  f = w1.shape[1]
  flat = planes.reshape(3 * h * w, c)
  outs = _call(
    functools.partial(_forward_kernel, h=h, w=w, precision=precision),
    interpret,
    *_coords6(coords_np2),
    flat,
    w1,
    b1,
    w2.T,
    b2,
    out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 4,
    grid=(n // block,),
    in_specs=[
      *_specs(block, 6),
      pl.BlockSpec(memory_space=pl.ANY),  # The planes: gathered from, never blocked.
      *_specs(block, 0, (c, f), (f,), (4, f)),
      pl.BlockSpec(memory_space=pl.ANY),  # b2: four scalars.
    ],
    out_specs=[pl.BlockSpec((block,), lambda i: (i,))] * 4,
    name='triplane_lookup_mlp',
  )
  return jnp.stack(outs, axis=-1)


def _logits_fwd(planes, coords_np2, mlp, block, precision, interpret):
  return _logits(planes, coords_np2, mlp, block, precision, interpret), (planes, coords_np2, mlp)


def _logits_bwd(block, precision, interpret, res, g_n4):
  planes, coords_np2, mlp = res
  _, h, w, c = planes.shape
  n = coords_np2.shape[0]
  w1, b1, w2, _ = mlp
  f = w1.shape[1]
  span = _BWD_BLOCK * _BWD_STEPS
  nb = n // span
  dfeat, dw1, db1, dw2t = _call(
    functools.partial(
      _backward_kernel, h=h, w=w, block=_BWD_BLOCK, steps=_BWD_STEPS, precision=precision
    ),
    interpret,
    *_coords6(coords_np2),
    *(g_n4[:, j] for j in range(4)),
    planes.reshape(3 * h * w, c),
    w1,
    w1.T,
    b1,
    w2.T,
    out_shape=[
      jax.ShapeDtypeStruct((n, c), jnp.float32),
      jax.ShapeDtypeStruct((nb, c, f), jnp.float32),
      jax.ShapeDtypeStruct((nb, f), jnp.float32),
      jax.ShapeDtypeStruct((nb, 4, f), jnp.float32),
    ],
    grid=(nb,),
    in_specs=[
      *_specs(span, 10),
      pl.BlockSpec(memory_space=pl.ANY),
      *_specs(block, 0, (c, f), (f, c), (f,), (4, f)),
    ],
    out_specs=[
      pl.BlockSpec((span, c), lambda i: (i, 0)),
      pl.BlockSpec((None, c, f), lambda i: (i, 0, 0)),
      pl.BlockSpec((None, f), lambda i: (i, 0)),
      pl.BlockSpec((None, 4, f), lambda i: (i, 0, 0)),
    ],
    name='triplane_lookup_mlp_bwd',
  )
  # The feats were the taps' mean: their gradient goes to the planes like the lookup's.
  dplanes = scatter_taps(planes.shape, coords_np2, dfeat, 'auto').astype(planes.dtype)
  dmlp = (dw1.sum(0), db1.sum(0), dw2t.sum(0).T, g_n4.sum(0))
  return dplanes, jnp.zeros_like(coords_np2), tuple(d.astype(m.dtype) for m, d in zip(mlp, dmlp))


_logits.defvjp(_logits_fwd, _logits_bwd)


def fused_logits(
  planes: jax.Array,
  points: jax.Array,
  mlp_params: Any,
  box_size: float,
  plane_axes: str = 'xyz',
  box_center=(0.0, 0.0, 0.0),
  *,
  block: int = 256,
  precision: str | None = None,
  interpret: bool | None = None,
) -> jax.Array:
  """The point MLP's 4 logits (raw density, then 3 colour logits) at world points.

  Args:
    planes: (3, H, W, C) triplanes. bfloat16 planes are read as they are and widened to
      float32 in the kernel: the values of float32 planes converted beforehand, in half the
      gathered bytes (the decoder's planes are bfloat16 in the paper configs).
    points: (n, 3) world coordinates.
    mlp_params: `point_mlp`'s {'hidden': {'kernel' (C, F), 'bias' (F,)}, 'out': {'kernel'
      (F, 4), 'bias' (4,)}}, F a power of two ≥ 16 and C one ≥ 16 (Triton's matmul).
    box_size, plane_axes, box_center: see `planes.plane_coords`.
    block: points per kernel instance (a power of two).
    precision: of the two matmuls (None: the platform's default; 'highest' for float32).
    interpret: run the kernel in Pallas' interpreter (None: on every platform but GPUs, chosen
      when the program is lowered).

  Returns:
    (n, 4) float32 logits: `point_mlp`'s x before its sigmoid (column 0 the raw density).
  """
  if plane_axes not in PLANE_AXES:
    raise ValueError(f'render.plane_axes must be one of {sorted(PLANE_AXES)}, got {plane_axes!r}.')
  hid, out = mlp_params['hidden'], mlp_params['out']
  c, f = hid['kernel'].shape
  if planes.shape[-1] != c:
    raise ValueError(
      f'fused_logits: the planes have {planes.shape[-1]} channels but the point MLP takes {c}: '
      'mlp_params from another model?'
    )
  for name, size in (('channels', c), ('render.mlp_hidden', f), ('block', block)):
    if size < 16 or size & (size - 1):
      raise ValueError(
        f"render.lookup='pallas' needs {name} to be a power of two >= 16 (Triton's block "
        f"shapes and matmuls), got {size}; use render.lookup='xla'."
      )
  mlp = tuple(
    jnp.asarray(a, jnp.float32) for a in (hid['kernel'], hid['bias'], out['kernel'], out['bias'])
  )
  n = points.shape[0]
  coords = plane_coords(points.astype(jnp.float32), box_size, plane_axes, box_center)
  # Padded points sit outside the box: zero features, outputs dropped.
  span = max(block, _BWD_BLOCK * _BWD_STEPS)  # Whole programs in both passes.
  coords = jnp.pad(coords, ((0, _pad(n, span)), (0, 0), (0, 0)), constant_values=2.0)
  prec = None if precision is None else jax.lax.Precision(precision)
  if planes.dtype != jnp.bfloat16:
    planes = planes.astype(jnp.float32)
  return _logits(planes, coords, mlp, block, prec, interpret)[:n]
