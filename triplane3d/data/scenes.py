"""Exact ray casting of textured primitives: the geometry behind the synthetic-scenes dataset.

Every primitive lives in its own local frame (centre + rotation), so a world ray (o, d) with
unit d becomes (Rᵀ(o − c), Rᵀd), still unit length: the ray parameter t is the same in both
frames and is the renderer's depth (distance along the unit ray, docs/method.md). Intersections are
closed form (sphere, box, cylinder, cone: quadratics and slabs; torus: the quartic's real roots
from a batched companion-matrix eigenvalue solve, then Newton-polished), so depth is exact up
to float64 rounding. Shapes are named arrays: `o_n3`, `d_n3` are N rays; `t_n` their hit
distances (inf on a miss), `n_n3` unit surface normals, `p_n3` local hit points.
"""

from __future__ import annotations

import numpy as np

SHAPES = ('sphere', 'box', 'cylinder', 'cone', 'torus')


def _safe(d):
  # Slab / cap divisions: a zero direction component must give ±inf, never NaN.
  return np.where(np.abs(d) < 1e-12, 1e-12, d)


def _first_root(a, b, c, valid_fn):
  """Smallest t > 0 of a t² + 2b t + c = 0 for which valid_fn(t) holds; inf otherwise."""
  disc = b * b - a * c
  ok = disc >= 0
  sq = np.sqrt(np.where(ok, disc, 0.0))
  a = _safe(a)
  best = np.full(a.shape, np.inf)
  for t in ((-b - sq) / a, (-b + sq) / a):
    good = ok & (t > 1e-9) & valid_fn(t)
    best = np.where(good & (t < best), t, best)
  return best


def sphere(o, d, radius):
  """Returns (t_n, n_n3) for a sphere of `radius` at the local origin."""
  b = np.sum(o * d, -1)
  t = _first_root(np.ones_like(b), b, np.sum(o * o, -1) - radius**2, lambda t: True)
  p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
  return t, p / radius


def box(o, d, half):
  """Axis-aligned box with half extents `half` (3,): slab intersection."""
  half = np.asarray(half)
  inv = 1.0 / _safe(d)
  t1, t2 = (-half - o) * inv, (half - o) * inv
  tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
  t_near, t_far = tn.max(-1), tf.min(-1)
  hit = (t_far >= t_near) & (t_near > 1e-9)
  axis = tn.argmax(-1)
  n = np.zeros_like(o)
  n[np.arange(len(o)), axis] = -np.sign(d[np.arange(len(o)), axis])
  return np.where(hit, t_near, np.inf), n


def cylinder(o, d, radius, half_height):
  """Capped cylinder along local y."""
  a = d[:, 0] ** 2 + d[:, 2] ** 2
  b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
  c = o[:, 0] ** 2 + o[:, 2] ** 2 - radius**2
  t = _first_root(a, b, c, lambda t: np.abs(o[:, 1] + t * d[:, 1]) <= half_height)
  side = np.isfinite(t)
  for y in (-half_height, half_height):
    tc = (y - o[:, 1]) / _safe(d[:, 1])
    px, pz = o[:, 0] + tc * d[:, 0], o[:, 2] + tc * d[:, 2]
    good = (tc > 1e-9) & (px**2 + pz**2 <= radius**2) & (tc < t)
    t = np.where(good, tc, t)
    side &= ~good
  p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
  n = np.where(side[:, None], p * [1, 0, 1], [0, 1, 0] * np.sign(p[:, 1:2]))
  return t, n


def cone(o, d, radius, half_height):
  """Cone along local y: apex at y = +h, base disc of `radius` at y = −h."""
  k = (radius / (2 * half_height)) ** 2
  m = half_height - o[:, 1]  # h − y at the origin.
  a = d[:, 0] ** 2 + d[:, 2] ** 2 - k * d[:, 1] ** 2
  b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2] + k * m * d[:, 1]
  c = o[:, 0] ** 2 + o[:, 2] ** 2 - k * m**2

  def on_side(t):
    hy = m - t * d[:, 1]
    return (hy >= 0) & (hy <= 2 * half_height)

  t = _first_root(a, b, c, on_side)
  side = np.isfinite(t)
  tc = (-half_height - o[:, 1]) / _safe(d[:, 1])
  px, pz = o[:, 0] + tc * d[:, 0], o[:, 2] + tc * d[:, 2]
  good = (tc > 1e-9) & (px**2 + pz**2 <= radius**2) & (tc < t)
  t = np.where(good, tc, t)
  side &= ~good
  p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
  grad = np.stack([p[:, 0], k * (half_height - p[:, 1]), p[:, 2]], -1)
  return t, np.where(side[:, None], grad, [0.0, -1.0, 0.0])


def torus(o, d, major, minor):
  """Torus around local y: (|p|² + R² − r²)² = 4R²(x² + z²), solved as a quartic in t."""
  t = np.full(len(o), np.inf)
  # Only rays through the bounding sphere need the (costlier) quartic.
  b0 = np.sum(o * d, -1)
  cand = (b0 * b0 - (np.sum(o * o, -1) - (major + minor) ** 2)) >= 0
  if cand.any():
    oc, dc = o[cand], d[cand]
    h = np.sum(oc * dc, -1)
    g = np.sum(oc * oc, -1) + major**2 - minor**2
    r4 = 4 * major**2
    a3 = 4 * h
    a2 = 4 * h * h + 2 * g - r4 * (dc[:, 0] ** 2 + dc[:, 2] ** 2)
    a1 = 4 * h * g - 2 * r4 * (oc[:, 0] * dc[:, 0] + oc[:, 2] * dc[:, 2])
    a0 = g * g - r4 * (oc[:, 0] ** 2 + oc[:, 2] ** 2)
    comp = np.zeros((len(oc), 4, 4))
    comp[:, 0] = -np.stack([a3, a2, a1, a0], -1)
    comp[:, 1, 0] = comp[:, 2, 1] = comp[:, 3, 2] = 1.0
    roots = np.linalg.eigvals(comp)
    real = (np.abs(roots.imag) < 1e-6 * (1 + np.abs(roots.real))) & (roots.real > 1e-9)
    tr = np.where(real, roots.real, np.inf).min(-1)
    fin = np.isfinite(tr)
    x = np.where(fin, tr, 0.0)
    for _ in range(3):  # Newton polish: eigenvalue roots are good to ~1e-10 relative.
      f = (((x + a3) * x + a2) * x + a1) * x + a0
      df = ((4 * x + 3 * a3) * x + 2 * a2) * x + a1
      x = x - np.where(np.abs(df) > 1e-12, f / _safe(df), 0.0)
    t[cand] = np.where(fin, x, np.inf)
  p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
  s = np.sum(p * p, -1, keepdims=True) + major**2 - minor**2
  n = 4 * s * p - 8 * major**2 * p * [1, 0, 1]
  return t, n


def intersect(shape: str, o_n3, d_n3, size: float, aspect=(1.0, 1.0, 1.0)):
  """Hits a primitive of characteristic half-size `size` (its bounding radius ≈ size).

  Args:
    shape: one of SHAPES.
    o_n3, d_n3: ray origins and unit directions in the primitive's local frame, (N, 3).
    aspect: per-axis factors for the box half extents.

  Returns:
    (t_n, n_n3): distance along the ray (inf on a miss) and the unit normal (facing the ray).
  """
  if shape == 'sphere':
    t, n = sphere(o_n3, d_n3, size)
  elif shape == 'box':
    t, n = box(o_n3, d_n3, size * np.asarray(aspect) / np.sqrt(3))
  elif shape == 'cylinder':
    t, n = cylinder(o_n3, d_n3, 0.6 * size, 0.75 * size)
  elif shape == 'cone':
    t, n = cone(o_n3, d_n3, 0.7 * size, 0.7 * size)
  elif shape == 'torus':
    t, n = torus(o_n3, d_n3, 0.68 * size, 0.3 * size)
  else:
    raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}.')
  n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
  n = np.where(np.sum(n * d_n3, -1, keepdims=True) > 0, -n, n)
  return t, n
