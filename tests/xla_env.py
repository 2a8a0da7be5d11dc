"""XLA settings of the tests, and the environment their subprocesses run in.

The suite compiles far more than it runs (most tests run a tiny program a few times), so XLA:CPU
generates code at LLVM optimisation level 0: a tiny train step compiles in ~10 s instead of
~19 s on 2 cores. Only LLVM's work on the generated code changes (slower code); XLA's HLO
passes, and so buffer sizes and the operations each program runs, do not. Measured: the tiny
trainer's losses agree to every printed digit with and without it.
"""

import os

COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def flags(devices: int = 1) -> str:
  """XLA_FLAGS for a test process with `devices` CPU devices."""
  if devices == 1:
    return COMPILE_FLAGS
  return f'{COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}'


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """This process's environment for a child with `devices` CPU devices (default one: the
  quickest compile; the test process's 8 fake devices only slow small batches down)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS=flags(devices), **extra)
  return env
