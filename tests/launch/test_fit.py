"""The ahead-of-time fit check: the demo config's real train step compiled for a v5e:2x2 slice
by libtpu on this CPU machine (`python -m triplane3d.launch.fit`), while another process holds
libtpu's lockfile; and the batch search's walk on a memory model."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triplane3d.configs
from triplane3d.configs import demo
from triplane3d.launch import fit

LOCKFILE = '/tmp/libtpu_lockfile'
CONFIGS = Path(triplane3d.configs.__file__).parent

# Holds libtpu's lockfile the way libtpu does (an fcntl write lock) until killed; removes the
# file on exit if it made it, as libtpu does.
_HOLDER = f"""
import fcntl, os, signal, sys, time
made = not os.path.exists({LOCKFILE!r})
fd = os.open({LOCKFILE!r}, os.O_RDWR | os.O_CREAT, 0o600)
try:
  fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  print('held', flush=True)
except OSError:
  print('busy', flush=True)  # Another libtpu user holds it already: just as good.
def stop(*_):
  if made:
    os.remove({LOCKFILE!r})
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)
time.sleep(3600)
"""


def _fit_cli(out, *args, topology='v5e:2x2'):
  cmd = [sys.executable, '-m', 'triplane3d.launch.fit', f'--config={CONFIGS / "demo.py"}']
  proc = subprocess.run(
    [*cmd, f'--topology={topology}', f'--json={out}', *args],
    capture_output=True, text=True, timeout=1200,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)
  return json.loads(out.read_text())


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  """The CLI's JSON for the demo config at 4 images per chip on v5e:2x2 (one compile, ~2 min
  on 2 cores), run while another process holds libtpu's lockfile."""
  out = tmp_path_factory.mktemp('fit') / 'fit.json'
  holder = subprocess.Popen([sys.executable, '-c', _HOLDER], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() in ('held', 'busy')
    return _fit_cli(out, '--batch_per_chip=4')
  finally:
    holder.terminate()
    holder.wait()


@pytest.mark.slow
def test_demo_fits_a_v5e_chip_with_the_memory_broken_down(report):
  (r,) = report['compiles']
  assert (r['topology'], r['chips'], r['batch_per_chip'], r['fsdp']) == ('v5e:2x2', 4, 4, 1)
  assert r['hbm_bytes'] == 16 * 2**30
  assert r['fits'] and not r['error']
  assert r['temporaries'] > 0 and r['arguments'] > 0 and r['code'] > 0
  # The state is donated: every output but the scalar metrics reuses an argument's buffer.
  assert 0 <= r['outputs'] - r['aliases'] < 2**16
  total = r['arguments'] + r['outputs'] - r['aliases'] + r['temporaries'] + r['code']
  assert r['total'] == total < r['hbm_bytes']


def test_xla_flops_per_image_count_loops_and_match_the_analytic_count(report):
  (r,) = report['compiles']
  assert r['unknown_trip_loops'] == 0
  # The 12 plane taps run in fori_loops: their bodies count 12 times, not once.
  assert r['xla_flops_per_image'] > r['xla_flops_per_image_loops_once']
  ratio = r['xla_flops_per_image'] / r['analytic_flops_per_image']
  assert 0.8 < ratio < 2.0, ratio


def test_a_huge_batch_does_not_fit(tmp_path):
  """8192 images per chip: XLA refuses the program at buffer assignment (~20 s, no code
  generation); the report says so, with the temporaries XLA asked for."""
  (r,) = _fit_cli(tmp_path / 'huge.json', '--batch_per_chip=8192')['compiles']
  assert not r['fits'] and 'RESOURCE_EXHAUSTED' in r['error']
  assert r['temporaries'] > r['hbm_bytes']


def test_quick_estimate_is_close_to_the_full_compile(report, tmp_path):
  """--quick (no code generation) names temporaries within 25 % below the full compile's;
  its arguments are the unpadded shard sizes (TPU layouts pad small arrays to tiles)."""
  (full,) = report['compiles']
  (quick,) = _fit_cli(tmp_path / 'quick.json', '--batch_per_chip=4', '--quick')['compiles']
  assert quick['quick'] and quick['fits'] and not quick['error']
  assert 0.75 * full['temporaries'] < quick['temporaries'] <= full['temporaries']
  assert 0.7 * full['arguments'] < quick['arguments'] <= full['arguments']
  assert quick['compile_s'] < full['compile_s']


def _affine(compiled, extra=lambda b, quick: 0.0):
  """A fake `check`: 1 GiB fixed + 0.25 GiB per image of temporaries (+ 0.5 GiB that do not
  grow) on a 16 GiB chip; `extra(b, quick)` GiB more temporaries."""

  def fake_check(config, topology, b, fsdp=None, quick=False):
    compiled.append((b, 'quick' if quick else 'full'))
    temp = int((0.5 + 0.25 * b + extra(b, quick)) * fit.GIB)
    total = fit.GIB + temp
    fits = total <= 16 * fit.GIB
    return fit.Fit(topology, 4, b, 1, 16 * fit.GIB, fits, total, temporaries=temp, quick=quick)

  return fake_check


def test_search_walks_to_the_largest_power_of_two(monkeypatch):
  """58 images fit: 32 is the answer, found with quick compiles that fit (8, 32) and one that
  does not (64), then confirmed by full ones; the line through 8 and 32 gives 58."""
  compiled = []
  monkeypatch.setattr(fit, 'check', _affine(compiled))
  best, estimate, reports = fit.search(demo.get_config(), 'v5e:2x2', log=lambda _: None)
  assert best == 32 and estimate == pytest.approx(58)
  q, f = 'quick', 'full'
  assert compiled == [(8, q), (32, q), (64, q), (32, f), (64, f)]
  assert [(r.batch_per_chip, r.quick) for r in reports] == [
    (8, True),
    (32, True),
    (64, True),
    (32, False),
    (64, False),
  ]


def test_search_quick_only(monkeypatch):
  compiled = []
  monkeypatch.setattr(fit, 'check', _affine(compiled))
  best, _, _ = fit.search(demo.get_config(), 'v5e:2x2', quick=True, log=lambda _: None)
  assert best == 32 and all(kind == 'quick' for _, kind in compiled)


def test_search_walks_down_when_full_compiles_need_more(monkeypatch):
  """Full compiles need 10 GiB more than quick ones say: the answer halves to 16."""
  compiled = []
  monkeypatch.setattr(fit, 'check', _affine(compiled, lambda b, quick: 0.0 if quick else 10.0))
  best, _, _ = fit.search(demo.get_config(), 'v5e:2x2', log=lambda _: None)
  assert best == 16 and compiled[-2:] == [(32, 'full'), (16, 'full')]


def test_search_recovers_when_the_line_is_wrong(monkeypatch):
  """Memory that jumps by 20 GiB past 16 images per chip: the walk goes down to 16."""
  compiled = []
  monkeypatch.setattr(fit, 'check', _affine(compiled, lambda b, quick: 20.0 * (b > 16)))
  best, _, _ = fit.search(demo.get_config(), 'v5e:2x2', quick=True, log=lambda _: None)
  assert best == 16 and [b for b, _ in compiled] == [8, 32, 16]


def test_search_walks_down_when_the_start_does_not_fit(monkeypatch):
  compiled = []
  monkeypatch.setattr(fit, 'check', _affine(compiled, lambda b, quick: 20.0 * (b > 2)))
  best, _, _ = fit.search(demo.get_config(), 'v5e:2x2', quick=True, log=lambda _: None)
  assert best == 2 and [b for b, _ in compiled] == [8, 4, 2]


def test_out_of_memory_message_is_read():
  msg = (  # What libtpu 0.0.42 says (the demo at 8192 images per chip on v5e).
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
    'temporaries (85.98G) exceeds available HBM (15.75G).'
  )
  assert fit._needed_bytes(msg) == (int(85.98 * 2**30), int(15.75 * 2**30))
  msg = 'RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 19.40G of 15.75G hbm.'
  assert fit._needed_bytes(msg) == (int(19.40 * 2**30), int(15.75 * 2**30))


def test_unknown_topology_names_the_choices():
  with pytest.raises(ValueError, match=r"'v4', 'v5e', 'v5p', 'v6e'.*'a100', 'h100', 'h200'"):
    fit.chip_of('v3:2x2')
  for bad in ('h100', 'h100:0', 'h100:2x', 'h100:1x2x8'):
    with pytest.raises(ValueError, match="'h100:8'"):
      fit._gpu_layout(bad)
  assert fit._gpu_layout('h100:8') == (1, 8) and fit._gpu_layout('h200:2x8') == (2, 8)
  assert fit.gpu_of('v5e:2x2') is None and fit.gpu_of('h200:8') is fit.GPUS['h200']


def test_demo_on_two_h100s(tmp_path):
  """The demo's step compiled by XLA:GPU for 2 H100s on this CPU (the CUDA plugin of the
  gpu-aot extra, no GPU): memory against the 75 % of the GPU JAX takes, and the kernels a step
  launches (~35 s). That GPUs get `render.gpu_chunk` is checked on the exported programs
  (tests/render/test_renderer.py); what it saved, measured on an H100, is in
  docs/performance.md (368 325 → 4 628 kernels per step)."""
  cli = functools.partial(_fit_cli, topology='h100:2')
  chunks = ('--config.render.chunk=256', '--config.render.gpu_chunk=262144')
  (r,) = cli(tmp_path / 'a.json', '--batch_per_chip=4', *chunks)['compiles']
  assert (r['topology'], r['chips'], r['batch_per_chip'], r['fsdp']) == ('h100:2', 2, 4, 1)
  assert r['hbm_bytes'] == int(0.75 * fit.GPUS['h100'].memory_bytes)
  assert r['fits'] and not r['error'] and r['temporaries'] > 0 and r['arguments'] > 0
  assert 0 <= r['outputs'] - r['aliases'] < 2**16  # The state is donated on GPUs too.
  total = r['arguments'] + r['outputs'] - r['aliases'] + r['temporaries'] + r['code']
  assert r['total'] == total
  assert r['kernel_launches'] > 0 and r['xla_flops_per_image'] == 0  # No GPU FLOPs column.


def test_gpu_memory_share_and_the_missing_plugin(monkeypatch):
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE', raising=False)
  assert fit.gpu_memory_fraction() == 0.75
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.9')
  assert fit.gpu_memory_fraction() == 0.9
  monkeypatch.setenv('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  assert fit.gpu_memory_fraction() == 1.0
  with pytest.raises(ValueError, match='TPU topologies only'):
    fit.check(demo.get_config(), 'h100:1', 4, quick=True)
  from jax.experimental import topologies

  def no_plugin(*args, **kwargs):  # What jax raises where no CUDA plugin is installed.
    raise NotImplementedError('topology not implemented for cuda')

  monkeypatch.setattr(topologies, 'get_topology_desc', no_plugin)
  with pytest.raises(RuntimeError, match=r'pip install -e "\.\[gpu-aot\]"'):
    fit.topology_devices('h100:8')


def test_gpu_target_config_is_what_xla_reads():
  text = fit.GPUS['h100'].target_config()
  assert 'core_count: 132' in text and 'device_memory_size: 84942979072' in text
  assert 'major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES' in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert 'feature_extension: NONE' in fit.GPUS['a100'].target_config()


def test_loading_libtpu_takes_no_lockfile():
  """libtpu loaded by the fit check holds no lock on libtpu's lockfile (/proc/locks lists
  every POSIX lock with its process id), so a TPU job started next to it is not refused."""
  before = dict(os.environ)
  assert len(fit.topology_devices('v5e:2x2')) == 4
  assert dict(os.environ) == before  # libtpu's settings are not left to later code.
  if not os.path.exists(LOCKFILE):
    return  # Nobody holds it, this process included.
  inode = os.stat(LOCKFILE).st_ino
  mine = [
    line
    for line in Path('/proc/locks').read_text().splitlines()
    if line.split()[4] == str(os.getpid()) and line.split()[5].endswith(f':{inode}')
  ]
  assert not mine
