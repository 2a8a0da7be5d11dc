"""`python -m triplane3d.benchmark`: the step benchmark on the demo config shrunk to tiny sizes
(8 CPU devices) writes its JSON; the data mode times the pipeline; the FLOP accounting
counts loop bodies by their trip counts and the analytic formula matches a hand count."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import triplane3d.configs
from triplane3d import benchmark
from triplane3d.configs import demo

DEMO = Path(triplane3d.configs.__file__).parent / 'demo.py'
# tests/tiny.py's sizes: a step in well under a second.
TINY = {
  'model.img_size': 28, 'decoder.width': 32, 'decoder.num_heads': 2, 'decoder.low_res': 4,
  'decoder.up_channels': '(8,)', 'decoder.plane_channels': 8, 'render.resolution': 8,
  'render.num_coarse': 6, 'render.num_fine': 4, 'render.mlp_hidden': 16,
  'train.batch_size': 8, 'data.num_synthetic': 16,
}  # fmt: skip


def _run(tmp_path, *args):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, '-m', 'triplane3d.benchmark', f'--config={DEMO}', f'--json={out}']
  cmd += [f'--config.{k}={v}' for k, v in TINY.items()] + list(args)
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text()), proc


def test_step_benchmark_writes_its_json(tmp_path):
  r, proc = _run(tmp_path, '--steps=3', '--warmup=1')
  assert 'images_per_s' in proc.stdout and 'mfu' in proc.stdout  # The readable table.
  # Each phase is reported on stderr as it ends (a run stopped by a time limit says how far
  # it got): the compile with the time the JSON records.
  progress = [x for x in proc.stderr.splitlines() if x.startswith('benchmark: ')]
  assert [x.split(' (')[0] for x in progress] == [
    'benchmark: state, teacher and batch ready',
    f'benchmark: step compiled in {r["compile_s"]:.1f} s',
    f'benchmark: 1 + 3 steps run, median {r["step_s_median"]:.4f} s',
  ]
  assert (r['mode'], r['platform'], r['devices'], r['global_batch']) == ('step', 'cpu', 8, 8)
  assert len(r['step_s']) == 3 and r['step_s_median'] == sorted(r['step_s'])[1]
  for key in (
    'compile_s', 'step_s_median', 'images_per_s', 'images_per_s_per_device',
    'flops_per_image_analytic', 'flops_per_image_xla', 'flops_per_image_xla_loops_once',
    'achieved_flops_per_device', 'peak_flops_per_device', 'mfu', 'memory_peak_bytes',
    'kernel_launches_per_step',
  ):  # fmt: skip
    assert r[key] > 0, key
  assert r['images_per_s'] == pytest.approx(8 / r['step_s_median'])
  assert r['images_per_s_per_device'] == pytest.approx(r['images_per_s'] / 8)
  assert r['peak_source'].startswith('measured')
  assert r['mfu'] == pytest.approx(r['achieved_flops_per_device'] / r['peak_flops_per_device'])
  # XLA counts what the formula leaves out (norms, softmax, the sort, remat): more, not wildly.
  assert 0.8 < r['xla_over_analytic'] < 3.0
  assert r['flops_per_image_xla'] >= r['flops_per_image_xla_loops_once']
  assert r['config'].endswith('demo.py') and r['overrides']['render.resolution'] == 8


def test_peak_flops_flag_overrides_the_measurement_and_profile_traces(tmp_path):
  prof = tmp_path / 'prof'
  r, proc = _run(tmp_path, '--steps=1', '--warmup=0', '--peak_flops=1e15', f'--profile={prof}')
  assert r['peak_flops_per_device'] == 1e15 and r['peak_source'] == '--peak_flops'
  # The trace is written and, from the instrumented CPU program, read on the host threads: every
  # part of the model ran, and the parts add up to the busy time (tests/test_device_time.py).
  t = r['device_time']
  assert Path(t['trace']).is_file() and str(t['trace']).startswith(str(prof))
  assert t['source'] == 'host threads' and t['kernels_per_step'] > 0
  parts = t['by_part_s_per_step']
  assert {'backbone', 'backbone bwd', 'teacher', 'decoder', 'decoder bwd', 'renderer'} <= set(parts)
  assert 'unattributed' not in parts
  assert sum(parts.values()) == pytest.approx(t['device_busy_s_per_step'], rel=1e-6)
  # Ops run only inside the traced steps, each timed from its call to its last output.
  assert len(t['traced_step_s']) == 2 and t['traced_step_s_median'] > 0
  assert 0 < t['device_busy_s_per_step'] <= sum(t['traced_step_s']) / 2
  assert 'profile: trace' in proc.stdout and 'profile: s/step by part' in proc.stdout
  assert ' runs, ' in proc.stdout and ' kernels, ' not in proc.stdout  # Ops, not GPU kernels.
  op_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('profile: op ')]
  assert any(p in ln for ln in op_lines for p in ('render/', 'Decoder/', 'DinoViT'))  # Scopes.
  assert 'benchmark: 2 steps traced and summarised' in proc.stderr


def test_data_mode_times_the_pipeline_per_worker_count(tmp_path):
  r, proc = _run(tmp_path, '--mode=data', '--workers=0,1', '--steps=2', '--accelerator=v5e-8')
  assert r['mode'] == 'data' and r['pixels'] == 'uint8'  # The trainer's wire format.
  for key in ('images_per_s_per_host', 'main_cpu_ms_per_image'):
    assert set(r[key]) == {'0', '1'} and all(v > 0 for v in r[key].values()), key
  assert r['decode_cpu_ms_per_image'] == r['main_cpu_ms_per_image']['0']
  need = r['host_need']
  assert need['accelerator'] == 'v5litepod-8' and need['chips_per_host'] == 8
  assert need['host_vcpus'] == 224  # ct5lp-hightpu-8t.
  # 8 chips × 197 TFLOP/s over the tiny demo's analytic train FLOPs per image, at 40 %.
  tiny = demo.get_config()
  tiny.update_from_flattened_dict(
    {k: ast.literal_eval(v) if isinstance(v, str) else v for k, v in TINY.items()}
  )
  per_host = 8 * 197e12 / benchmark.analytic_flops(tiny)['train']
  assert need['images_per_s_at_100pct_mfu'] == pytest.approx(per_host)
  assert need['images_per_s'] == pytest.approx(0.4 * per_host)
  assert r['decode_cores_needed'] == pytest.approx(
    need['images_per_s'] * r['decode_cpu_ms_per_image'] / 1e3
  )
  take = r['take_cpu_ms_per_image']
  assert set(take) == {'1'} and 0 <= take['1'] < r['main_cpu_ms_per_image']['0']
  if take['1'] > 0:  # Less the idle wait's cost, a tiny batch's take can come out as 0.
    assert r['main_process_max_images_per_s'] == pytest.approx(1e3 / take['1'])
  assert '1 workers' in proc.stdout and 'host need: images_per_s' in proc.stdout


def test_loop_bodies_count_trip_count_times():
  """A 10-step fori_loop of a (64, 256) @ (256, 256) matmul: XLA's cost analysis counts one
  matmul; `xla_flops` counts ten."""
  w = jnp.ones((256, 256))

  def f(x):
    return jax.lax.fori_loop(0, 10, lambda i, x: jnp.tanh(x @ w), x)

  compiled = jax.jit(f).lower(jnp.ones((64, 256))).compile()
  one = 2 * 64 * 256 * 256
  out = benchmark.xla_flops(compiled)
  assert out['once'] == pytest.approx(one, rel=0.05)
  assert out['with_trips'] == pytest.approx(10 * one, rel=0.05)
  assert [t for _, t in out['loops']] == [10] and out['unknown_trips'] == 0


def _launches(trips, inner=0):
  """Kernel launches of a fori_loop of `trips` steps (each nesting one of `inner` steps if
  inner > 0) around two kernels XLA cannot fuse (a matmul, a sort)."""
  w = jnp.ones((32, 32))

  def body(i, x):
    return jnp.sort(jnp.tanh(x @ w), axis=0)

  def step(i, x):
    return jax.lax.fori_loop(0, inner, body, x) if inner else body(i, x)

  f = lambda x: jax.lax.fori_loop(0, trips, step, x) + 1.0  # noqa: E731
  return benchmark.kernel_launches(jax.jit(f).lower(jnp.ones((8, 32))).compile())


def test_kernel_launches_count_loop_bodies_trip_count_times():
  """Launches grow by the body's kernels per trip, and nested loops multiply."""
  a, b = _launches(3), _launches(7)
  per_trip = (b['total'] - a['total']) / 4
  assert per_trip >= 2 and per_trip == int(per_trip) and b['unknown_trips'] == 0
  assert b['in_loops'] == 7 * per_trip and b['total'] > b['in_loops']  # The + 1.0 outside.
  # Three more inner trips add their kernels once per outer trip.
  once = _launches(1, inner=6)['total'] - _launches(1, inner=3)['total']
  assert once > 0 and _launches(5, inner=6)['total'] - _launches(5, inner=3)['total'] == 5 * once
  # From the module text too (what the fit check reads for another platform's program).
  text = jax.jit(lambda x: x * 2).lower(jnp.ones(3)).compile().as_text()
  assert benchmark.kernel_launches(text) == {'total': 1, 'in_loops': 0, 'unknown_trips': 0}


def test_analytic_flops_by_hand_for_vit_s():
  """ViT-S/14 at 224 px: 257 tokens, 12 blocks of 12·384² matmul weights."""
  c = demo.get_config()
  c.model.variant, c.model.img_size = 'vits14', 224
  d, t = 384, 257
  vit = 2 * 256 * 3 * 14 * 14 * d + 12 * (2 * 12 * d * d * t + 4 * t * t * d)
  parts = benchmark.analytic_flops(c)
  assert parts['backbone'] == vit and parts['teacher'] == vit
  assert parts['train'] == 3 * (vit + parts['decoder'] + parts['render']) + vit
  rays, k, ch, hid = 32 * 32, 24, 16, 32
  assert parts['render'] == rays * k * (2 * (ch * hid + 4 * hid) + 24 * ch)
  c.loss.dist_weight = 0.0
  assert benchmark.analytic_flops(c)['teacher'] == 0
