"""Test setup: 8 fake CPU devices (for sharding tests) and a float32 default everywhere.

The XLA flag must be set before jax is imported anywhere, hence at module import time.
"""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Tests compare against float64 / PyTorch references: no TF32-style shortcuts on matmuls.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax
import pytest


@pytest.fixture(scope='session')
def devices():
  devs = jax.devices()
  assert len(devs) == 8, f'expected 8 fake CPU devices, got {len(devs)}'
  return devs
