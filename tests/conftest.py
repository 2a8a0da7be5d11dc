"""Test setup: 8 fake CPU devices (for sharding tests) and a float32 default everywhere.

The XLA flag must be set before jax is imported anywhere, hence at module import time.
"""

import os

import xla_env

# 8 fake CPU devices, and XLA:CPU's quick code generation (see tests/xla_env.py).
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {xla_env.flags(8)}'.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests compare against float64 / PyTorch references: no TF32-style shortcuts on matmuls.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import tempfile

import jax
import pytest

# Several tests compile the same tiny train step (resume = uninterrupted runs it three times,
# multi-process runs twice): a persistent compilation cache, shared by xdist workers and
# subprocesses, turns the repeats into cache hits.
CACHE_DIR = os.path.join(tempfile.gettempdir(), 'triplane3d_test_jax_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', CACHE_DIR)
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def devices():
  devs = jax.devices()
  assert len(devs) == 8, f'expected 8 fake CPU devices, got {len(devs)}'
  return devs


def pytest_collection_modifyitems(config, items):
  """Runs the modules that hold a test marked `slow` first, each module's tests kept together
  (module fixtures are set up once) and in their order. With `--dist=worksteal` (pyproject)
  the long tests then start early and the short ones even out the two workers' ends, instead
  of one worker running a long test alone at the end."""
  del config
  heavy = {item.path for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.path not in heavy)  # Stable: the order is kept otherwise.
