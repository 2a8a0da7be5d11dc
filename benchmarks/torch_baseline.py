"""A straightforward PyTorch 3D-Prior train step, to time the JAX step against (issue 13).

  # The torch step alone (same config file and overrides as `python -m triplane3d.benchmark`):
  python benchmarks/torch_baseline.py --config=configs/vits.py --config.model.img_size=224 \
    --config.train.batch_size=2 --config.render.resolution=64 --config.render.num_coarse=16 \
    --config.render.num_fine=16 --steps=10 [--json=PATH]
  # Both, alternately (JAX, torch, JAX, torch, ...), each a fresh process, one summary:
  python benchmarks/torch_baseline.py --compare --rounds=3 --config=configs/vits.py \
    --config.model.img_size=224 ... --steps=10 --json=PATH

Built from what a PyTorch user would reach for: the official DINOv2 architecture
(`transformers.Dinov2Model`, random init: we time, not train) as student and frozen teacher,
the triplane decoder in plain `torch.nn`, EG3D's renderer equations (ray sampling with jitter,
`grid_sample` triplane lookup, OSG point MLP, MipRayMarcher2 compositing, sample_pdf importance
sampling), the paper's loss and `torch.optim.Adam`. Eager mode, default layouts, no fusing:
a benchmark, not a port. Sizes come from the same config schema as the JAX step, so both sides
run the same shapes. `--compare` adds the JAX float32 flags (`model.dtype`, `decoder.dtype`,
`render.mlp_dtype`, `model.remat=False`) to the JAX run; this script always runs float32.

Measured on the 2-core CPU with no other jobs (session 19), ViT-S/14 at the sizes above (265
GFLOP per step, analytic): JAX 1.19 s per step (46 % of its measured matmul peak), torch 1.34 s,
torch / JAX 1.14× (median of 3 A/B pairs, 1.11–1.14×). Under load from other jobs (earlier
sessions) the ratio read 1.4–4.6×: load slows the eager PyTorch step most. Details in
docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

# DINOv2's (width, depth, heads) per variant (the released models; vit_tiny14 is ours).
VIT_SIZES = {
  'vit_tiny14': (64, 4, 4),
  'vits14': (384, 12, 6),
  'vitb14': (768, 12, 12),
  'vitl14': (1024, 24, 16),
}


def dinov2(variant: str, depth: int | None = None) -> transformers.Dinov2Model:
  """The official DINOv2 architecture (518-px positional table, resized per input), random."""
  if variant not in VIT_SIZES:
    raise ValueError(f'model.variant={variant!r}: the baseline knows {sorted(VIT_SIZES)}.')
  width, num_layers, heads = VIT_SIZES[variant]
  cfg = transformers.Dinov2Config(
    hidden_size=width, num_hidden_layers=depth or num_layers, num_attention_heads=heads,
    mlp_ratio=4, image_size=518, patch_size=14, layer_norm_eps=1e-6, hidden_act='gelu',
  )  # fmt: skip
  return transformers.Dinov2Model(cfg)


def representation(vit: transformers.Dinov2Model, images: torch.Tensor, n: int) -> torch.Tensor:
  """h: the normed [cls, patch] tokens of the last n blocks side by side, (B, 1 + N, n·D)."""
  hidden = vit(pixel_values=images, output_hidden_states=True).hidden_states
  return torch.cat([vit.layernorm(x) for x in hidden[-n:]], dim=-1)


class CrossAttentionBlock(nn.Module):
  """Pre-norm: x += MHA(LN(x), LN(h)); x += MLP(LN(x)) (the JAX decoder's block)."""

  def __init__(self, width: int, kv_width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm_q, self.norm_kv = nn.LayerNorm(width, 1e-6), nn.LayerNorm(kv_width, 1e-6)
    self.q, self.out = nn.Linear(width, width), nn.Linear(width, width)
    self.k, self.v = nn.Linear(kv_width, width), nn.Linear(kv_width, width)
    self.norm_mlp = nn.LayerNorm(width, 1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

  def forward(self, x, h):
    def split(t):  # (B, L, D) -> (B, heads, L, D / heads)
      return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    kv = self.norm_kv(h)
    a = F.scaled_dot_product_attention(
      split(self.q(self.norm_q(x))), split(self.k(kv)), split(self.v(kv))
    )
    x = x + self.out(a.transpose(1, 2).flatten(2))
    return x + self.mlp(self.norm_mlp(x))


class TriplaneDecoder(nn.Module):
  """h (B, T, E) → planes (B, 3, C, R, R): 3·L² learned embeddings cross-attend to h, LN, then
  per plane (shared weights) bilinear ×2 → 3×3 conv → GELU blocks (or, with
  decoder.upsample='shuffle', 3×3 conv to 4× the channels → pixel_shuffle → GELU) and a 1×1
  conv to C."""

  def __init__(self, dec, kv_width: int):
    super().__init__()
    self.low_res, self.width = dec.low_res, dec.width
    self.embeddings = nn.Parameter(0.02 * torch.randn(3 * dec.low_res**2, dec.width))
    self.blocks = nn.ModuleList(
      CrossAttentionBlock(dec.width, kv_width, dec.num_heads) for _ in range(dec.num_layers)
    )
    self.norm = nn.LayerNorm(dec.width, 1e-6)
    chans = [dec.width, *dec.up_channels]
    self.shuffle = dec.get('upsample', 'bilinear') == 'shuffle'
    k = 4 if self.shuffle else 1
    self.convs = nn.ModuleList(
      nn.Conv2d(a, k * b, 3, padding=1) for a, b in itertools.pairwise(chans)
    )
    self.to_planes = nn.Conv2d(chans[-1], dec.plane_channels, 1)

  def forward(self, h):
    b, l = h.shape[0], self.low_res
    x = self.embeddings.expand(b, -1, -1)
    for block in self.blocks:
      x = block(x, h)
    x = self.norm(x).reshape(b * 3, l, l, self.width).permute(0, 3, 1, 2)
    for conv in self.convs:
      if self.shuffle:
        x = F.gelu(F.pixel_shuffle(conv(x), 2))
      else:
        x = F.gelu(conv(F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)))
    x = self.to_planes(x)
    return x.reshape(b, 3, *x.shape[1:])


class PointMLP(nn.Module):
  """EG3D's OSGDecoder: mean plane features (..., C) → hidden → softplus → 1 + 3."""

  def __init__(self, channels: int, hidden: int):
    super().__init__()
    self.hidden, self.out = nn.Linear(channels, hidden), nn.Linear(hidden, 4)

  def forward(self, feats):
    x = self.out(F.softplus(self.hidden(feats)))
    return torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001, x[..., :1]  # rgb, raw sigma


# --- The renderer: EG3D's ImportanceRenderer / MipRayMarcher2 equations, in torch. ---


@dataclasses.dataclass(frozen=True)
class RenderSpec:
  """The camera, sample range and box of `config.camera` + `config.render` (box planes xyz)."""

  resolution: int
  num_coarse: int
  num_fine: int
  near: float
  far: float
  margin: float
  box_center: tuple
  box_size: float
  intrinsics: tuple  # fx, fy, cx, cy (normalised)
  position: tuple
  rotation: tuple

  @classmethod
  def from_config(cls, config) -> RenderSpec:
    r, cam = config.render, config.camera
    got = (r.plane_axes, r.plane_space, r.white_background, r.rays_per_image)
    if got != ('xyz', 'box', False, 0):
      raise ValueError('the baseline renders xyz box planes, black background, every ray.')
    return cls(
      r.resolution, r.num_coarse, r.num_fine, cam.near, cam.far, cam.margin,
      tuple(cam.box_center), cam.box_size, (cam.fx, cam.fy, cam.cx, cam.cy),
      tuple(cam.position), tuple(cam.rotation),
    )  # fmt: skip

  def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions (R², 3) through the pixel centres, row-major (float64 maths)."""
    fx, fy, cx, cy = self.intrinsics
    c = (np.arange(self.resolution) + 0.5) / self.resolution
    v, u = np.meshgrid(c, c, indexing='ij')
    d = (
      np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)
      @ np.reshape(self.rotation, (3, 3)).T
    )
    d = (d / np.linalg.norm(d, axis=-1, keepdims=True)).reshape(-1, 3)
    o = np.broadcast_to(np.asarray(self.position), d.shape)
    return torch.tensor(o, dtype=torch.float32), torch.tensor(d, dtype=torch.float32)


def sample_planes_mean(planes, points, spec: RenderSpec):
  """EG3D's sample_from_planes + mean: planes (B, 3, C, H, W), points (B, M, 3) → (B, M, C)."""
  b, _, c, h, w = planes.shape
  unit = (points - points.new_tensor(spec.box_center)) * (2.0 / spec.box_size)
  grid = torch.stack([unit[..., [0, 1]], unit[..., [0, 2]], unit[..., [1, 2]]], dim=1)  # xy, xz, yz
  feats = F.grid_sample(
    planes.reshape(b * 3, c, h, w), grid.reshape(b * 3, 1, -1, 2),
    mode='bilinear', padding_mode='zeros', align_corners=False,
  )  # fmt: skip
  return feats.reshape(b, 3, c, -1).mean(1).transpose(1, 2)


def raymarch(colors, raw, depths):
  """EG3D's MipRayMarcher2 on (..., K, 3), (..., K, 1), (..., K, 1) → rgb, depth, weights."""
  deltas = depths[..., 1:, :] - depths[..., :-1, :]
  mid = lambda t: 0.5 * (t[..., :-1, :] + t[..., 1:, :])  # noqa: E731
  density_delta = F.softplus(mid(raw) - 1) * deltas
  alpha = 1 - torch.exp(-density_delta)
  # Transmittance as EG3D's product of (1 - alpha + 1e-10); triplane3d takes exp(-cumsum), the
  # same up to the 1e-10 (the test checks they agree).
  shifted = torch.cat([torch.ones_like(alpha[..., :1, :]), 1 - alpha + 1e-10], -2)
  weights = alpha * torch.cumprod(shifted, -2)[..., :-1, :]
  rgb = torch.sum(weights * mid(colors), -2)
  depth = torch.nan_to_num(torch.sum(weights * mid(depths), -2) / weights.sum(-2), float('inf'))
  # EG3D clamps to the batch's depth range; per ray (as triplane3d) is independent of batching.
  return rgb, torch.clamp(depth, depths.amin(-2), depths.amax(-2)), weights


@torch.no_grad()
def sample_importance(depths, weights, u):
  """EG3D's sample_importance + sample_pdf: coarse depths (N, K), weights (N, K-1), draws
  u (N, F) → fine depths (N, F)."""
  w = F.max_pool1d(weights[:, None], 2, 1, padding=1)
  w = F.avg_pool1d(w, 2, 1)[:, 0] + 0.01
  bins, w = 0.5 * (depths[:, :-1] + depths[:, 1:]), w[:, 1:-1] + 1e-5
  pdf = w / w.sum(-1, keepdim=True)
  cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
  inds = torch.searchsorted(cdf, u.contiguous(), right=True)
  below, above = torch.clamp_min(inds - 1, 0), torch.clamp_max(inds, pdf.shape[-1])
  cdf_lo, cdf_hi = cdf.gather(1, below), cdf.gather(1, above)
  bins_lo, bins_hi = bins.gather(1, below), bins.gather(1, above)
  denom = cdf_hi - cdf_lo
  denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
  return bins_lo + (u - cdf_lo) / denom * (bins_hi - bins_lo)


def render(planes, mlp, rays, jitter, u, spec: RenderSpec):
  """Renders n rays of each of B images: planes (B, 3, C, H, W), rays (origins, dirs) (n, 3),
  jitter (B, n, num_coarse) and u (B, n, num_fine) uniform draws. Returns rgb (B, n, 3), depth
  (B, n, 1), opacity (B, n, 1) and the activated densities (B, n, k) of every queried point."""
  origins, dirs = rays
  b, n, k = jitter.shape
  t0, t1 = spec.near - spec.margin, spec.far + spec.margin
  depths = torch.linspace(t0, t1, k) + jitter * ((t1 - t0) / (k - 1))  # EG3D: last may pass t1.

  def query(d):  # (B, n, k) depths → rgb (B, n, k, 3), raw (B, n, k, 1)
    points = origins[:, None] + dirs[:, None] * d[..., None]
    rgb, raw = mlp(sample_planes_mean(planes, points.reshape(b, -1, 3), spec))
    return rgb.reshape(*d.shape, 3), raw.reshape(*d.shape, 1)

  rgb, raw = query(depths)
  if spec.num_fine:
    _, _, w = raymarch(rgb, raw, depths[..., None])
    flat = lambda t: t.reshape(b * n, -1)  # noqa: E731
    fine = sample_importance(flat(depths), flat(w.detach()), flat(u)).reshape(b, n, -1)
    rgb_f, raw_f = query(fine)
    # EG3D's unify_samples: coarse and fine evaluations merged and sorted by depth.
    depths, order = torch.sort(torch.cat([depths, fine], -1), -1)
    take = lambda a, c: torch.gather(a, -2, order[..., None].expand(-1, -1, -1, c))  # noqa: E731
    rgb, raw = take(torch.cat([rgb, rgb_f], -2), 3), take(torch.cat([raw, raw_f], -2), 1)
  color, depth, weights = raymarch(rgb, raw, depths[..., None])
  # triplane3d's clip to the scene range with a straight-through gradient (render/renderer.py).
  depth = depth + (depth.clamp(spec.near, spec.far) - depth).detach()
  return color, depth, weights.sum(-2), F.softplus(raw[..., 0] - 1)


# --- The train step. ---


class Baseline:
  """Student, frozen teacher, decoder, point MLP and Adam, from the triplane3d config schema.

  `vit_depth` overrides the ViT's depth (tests)."""

  def __init__(self, config, vit_depth: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    m, loss, dec = config.model, config.loss, config.decoder
    if (loss.depth_loss, loss.norm_reduction, dec.kind, dec.attention_prior) != (
      'l2', 'mean', 'triplane', 'none'
    ):  # fmt: skip
      raise ValueError('the baseline implements the paper: l2 depth, mean L_norm, no prior.')
    self.config, self.spec = config, RenderSpec.from_config(config)
    self.student = dinov2(m.variant, vit_depth).train()
    self.teacher = dinov2(m.variant, vit_depth).eval().requires_grad_(False)
    self.decoder = TriplaneDecoder(config.decoder, m.num_layers_h * self.student.config.hidden_size)
    self.mlp = PointMLP(config.decoder.plane_channels, config.render.mlp_hidden)
    self.rays = self.spec.rays()
    o = config.optim
    self.opt = torch.optim.Adam(self.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=1e-8)

  def parameters(self) -> list[torch.Tensor]:
    return [p for mod in (self.student, self.decoder, self.mlp) for p in mod.parameters()]

  def batch(self, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch shaped like the JAX benchmark's (images NCHW here)."""
    g, b = torch.Generator().manual_seed(seed), self.config.train.batch_size
    s, r, cam = self.config.model.img_size, self.spec.resolution, self.config.camera
    return {
      'image': torch.randn(b, 3, s, s, generator=g),
      'rgb': torch.rand(b, r * r, 3, generator=g),
      'depth': cam.near + (cam.far - cam.near) * torch.rand(b, r * r, 1, generator=g),
    }

  def step(self, batch: dict[str, torch.Tensor]) -> float:
    """One Adam step on the paper's loss; returns the loss."""
    c, spec = self.config, self.spec
    h = representation(self.student, batch['image'], c.model.num_layers_h)
    with torch.no_grad():
      h_t = representation(self.teacher, batch['image'], c.model.num_layers_h)
    b, n = h.shape[0], spec.resolution**2
    jitter, u = torch.rand(b, n, spec.num_coarse), torch.rand(b, n, spec.num_fine)
    rgb, depth, _, dens = render(self.decoder(h), self.mlp, self.rays, jitter, u, spec)
    w = c.loss
    loss = (
      w.rgb_weight * F.mse_loss(rgb, batch['rgb'])
      + w.depth_weight * F.mse_loss(depth, batch['depth'])
      + w.dist_weight * F.mse_loss(h, h_t)
      + w.norm_weight * dens.abs().mean()
    )
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return float(loss.detach())


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of the best of `reps` float32 (n, n) @ (n, n) matmuls (the JAX benchmark's probe)."""
  a = torch.randn(n, n)
  a @ a
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def time_steps(config, steps: int, warmup: int) -> dict:
  """Median step time over `steps` steps after `warmup`, and the matmul peak, on every core."""
  torch.set_num_threads(os.cpu_count())
  base = Baseline(config)
  batch = base.batch()
  times, losses = [], []
  for i in range(warmup + steps):
    t = time.perf_counter()
    losses.append(base.step(batch))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return {
    'step_s_median': statistics.median(times), 'step_s': times, 'losses': losses,
    'matmul_peak_flops': matmul_peak(), 'threads': torch.get_num_threads(),
    'attn_implementation': base.student.config._attn_implementation,
    'torch': torch.__version__, 'transformers': transformers.__version__,
  }  # fmt: skip


# --- A/B comparison: fresh processes, alternating, so drift hits both sides alike. ---

JAX_FLOAT32 = ['--config.model.dtype=float32', '--config.decoder.dtype=float32']
JAX_FLOAT32 += ['--config.render.mlp_dtype=float32', '--config.model.remat=False']


def compare(argv: list[str], rounds: int, steps: int, warmup: int) -> dict:
  """Runs the JAX benchmark and this script alternately `rounds` times; returns the summary."""
  cfg = [a for a in argv if a.startswith('--config')]
  runs, load = {'jax': [], 'torch': []}, [os.getloadavg()[0]]  # Others' jobs share the CPU.
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(rounds):
      for side, cmd in (
        ('jax', [sys.executable, '-m', 'triplane3d.benchmark', *cfg, *JAX_FLOAT32]),
        ('torch', [sys.executable, os.path.abspath(__file__), *cfg]),
      ):
        out = os.path.join(tmp, f'{side}{i}.json')
        cmd += [f'--steps={steps}', f'--warmup={warmup}', f'--json={out}']
        env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}  # No accelerator probing (libtpu).
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        with open(out) as f:
          runs[side].append(json.load(f))
        load.append(os.getloadavg()[0])
        print(f'round {i} {side}: {runs[side][-1]["step_s_median"]:.3f} s/step', flush=True)
  j, t = runs['jax'], runs['torch']
  gflop = j[0]['flops_per_image_analytic'] * j[0]['global_batch'] / 1e9
  spread = lambda xs: [statistics.median(xs), min(xs), max(xs)]  # noqa: E731
  jax_s, torch_s = [r['step_s_median'] for r in j], [r['step_s_median'] for r in t]
  jax_peak = [r['peak_flops_per_device'] for r in j]
  torch_peak = [r['matmul_peak_flops'] for r in t]
  return {
    'rounds': rounds, 'steps': steps, 'warmup': warmup, 'config': cfg, 'cores': os.cpu_count(),
    'load_1min_median_min_max': spread(load),
    'gflop_per_step_analytic': gflop,
    'gflop_per_step_xla': j[0]['flops_per_image_xla'] * j[0]['global_batch'] / 1e9,
    'jax_step_s': spread(jax_s), 'torch_step_s': spread(torch_s),
    'torch_over_jax': spread([b / a for a, b in zip(jax_s, torch_s)]),
    'jax_peak_gflops': spread([p / 1e9 for p in jax_peak]),
    'torch_peak_gflops': spread([p / 1e9 for p in torch_peak]),
    'jax_pct_of_own_peak': spread([100 * gflop * 1e9 / s / p for s, p in zip(jax_s, jax_peak)]),
    'torch_pct_of_own_peak': spread([100 * gflop * 1e9 / s / p for s, p in zip(torch_s, torch_peak)]),
    'jax_runs': j, 'torch_runs': t,
  }  # fmt: skip


def main(argv: list[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  if f.compare:
    result = compare(sys.argv[1:], f.rounds, f.steps, f.warmup)
    for k, v in result.items():
      if not k.endswith('_runs'):
        print(f'{k:<24} {v}')
  else:
    result = time_steps(f.config, f.steps, f.warmup)
    print(f'torch step: median {result["step_s_median"]:.3f} s over {f.steps} steps; '
          f'matmul peak {result["matmul_peak_flops"] / 1e9:.1f} GFLOP/s')  # fmt: skip
  if f.json:
    with open(f.json, 'w') as fp:
      json.dump(result, fp, indent=1)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  vits = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'vits.py')
  config_flags.DEFINE_config_file('config', vits, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
  flags.DEFINE_bool('compare', False, 'Time the JAX benchmark and this step alternately.')
  flags.DEFINE_integer('rounds', 3, '--compare: JAX/torch pairs of runs.')
  flags.DEFINE_string('json', None, 'Also write the result as JSON here.')
  app.run(main)
