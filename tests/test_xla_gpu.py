"""The XLA:GPU atomics workaround (triplane3d/xla_gpu.py): when it applies, what it writes."""

import logging
import os
import subprocess
import sys

import pytest

from triplane3d import xla_gpu


@pytest.mark.parametrize(
  'version, hit',
  [('0.10.1', False), ('0.10.2', True), ('0.11.0', True), ('0.11.1', False), ('0.11.2', False)],
)
def test_affected_versions(version, hit):
  assert xla_gpu.affected(version) is hit


def test_version_tuple_reads_dev_builds_and_rejects_junk():
  assert xla_gpu.version_tuple('0.11.0.dev20260601+cuda13') == (0, 11, 0)
  with pytest.raises(ValueError, match='not a version'):
    xla_gpu.version_tuple('latest')


@pytest.mark.parametrize(
  'flags, want',
  [
    ('', '--xla_backend_extra_options=-x'),
    ('--xla_dump_to=/tmp/d', '--xla_dump_to=/tmp/d --xla_backend_extra_options=-x'),
    ('--xla_backend_extra_options=-a=1 --b', '--xla_backend_extra_options=-a=1,-x --b'),
    ('--xla_backend_extra_options=', '--xla_backend_extra_options=-x'),
  ],
)
def test_with_extra_option(flags, want):
  assert xla_gpu.with_extra_option(flags, '-x') == want


@pytest.fixture
def plugin(monkeypatch):
  """Pretends a CUDA plugin of the version set on the returned dict is installed."""
  installed = {}
  monkeypatch.setattr(xla_gpu, '_installed', installed.get)
  monkeypatch.setattr(xla_gpu, '_backend_started', lambda: False)
  return installed


def test_apply_sets_the_option_for_an_affected_cuda_plugin(plugin):
  plugin['jax-cuda12-plugin'] = '0.10.2'
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/d'}
  assert xla_gpu.apply(env)
  assert (
    env['XLA_FLAGS'] == '--xla_dump_to=/tmp/d --xla_backend_extra_options=-nvptx-allow-ftz-atomics'
  )
  assert not xla_gpu.apply(env)  # Idempotent: already there.
  assert env['XLA_FLAGS'].count(xla_gpu.FTZ_ATOMICS) == 1


@pytest.mark.parametrize(
  'installed, env',
  [
    ({}, {}),  # No CUDA plugin (CPU or TPU install).
    ({'jax-cuda13-plugin': '0.11.2'}, {}),  # A fixed jax.
    ({'jax-cuda12-plugin': '0.10.2'}, {'TRIPLANE3D_KEEP_XLA_FLAGS': '1'}),  # Opted out.
    ({'jax-cuda12-plugin': '0.10.2'}, {'XLA_FLAGS': '--xla_gpu_ftz=true'}),  # Atomics native.
    ({'jax-cuda12-pjrt': '0.11.0'}, {'XLA_FLAGS': '--xla_gpu_ftz --x=1'}),
  ],
)
def test_apply_leaves_flags_alone(plugin, installed, env):
  plugin.update(installed)
  before = dict(env)
  assert not xla_gpu.apply(env)
  assert env == before


def test_apply_warns_when_jax_already_started(plugin, monkeypatch, caplog):
  plugin['jax-cuda12-plugin'] = '0.11.0'
  monkeypatch.setattr(xla_gpu, '_backend_started', lambda: True)
  with caplog.at_level(logging.WARNING):
    assert xla_gpu.apply({})
  assert 'import triplane3d before running any jax code' in caplog.text


def test_cpu_compiles_accept_the_option():
  """Users with a CUDA plugin compile CPU programs too: the option must not break them."""
  code = (
    'import jax, jax.numpy as jnp\n'
    'f = jax.jit(lambda i: jnp.zeros(3).at[i].add(1.0))\n'
    'print(f(jnp.array([0, 0, 2])).tolist())\n'
  )
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': '--xla_backend_extra_options=-nvptx-allow-ftz-atomics',
  }
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[2.0, 0.0, 1.0]'


def test_backend_started_reads_jax():
  """The private jax helper the warning relies on: False before a computation, True after."""
  code = (
    'from triplane3d import xla_gpu\n'
    'import jax, jax.numpy as jnp\n'
    'before = xla_gpu._backend_started()\n'
    'jnp.zeros(1).block_until_ready()\n'
    'print(before, xla_gpu._backend_started())\n'
  )
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run(
    [sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.split() == ['False', 'True']
