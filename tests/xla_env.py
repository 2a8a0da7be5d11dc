"""XLA settings of the tests, and the environment their subprocesses run in.

The suite compiles far more than it runs (most tests run a tiny program a few times), so XLA:CPU
generates code at LLVM optimisation level 0: a tiny train step compiles in ~10 s instead of
~19 s on 2 cores. And it emits fusions with its older, quicker-to-compile IR emitters rather
than the MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`): the tiny train step's
compile 12.7 → 8.3 s, the renderer-memory test programs' 16.5 → 10.5 s. Only the code
generated for each fusion changes (slower code); XLA's HLO passes, and so buffer sizes and the
operations each program runs, do not: the renderer-memory tests' temporaries agree to 128 bytes
of 160 MiB, the tiny trainer's losses to every printed digit, with and without either flag.
"""

import os

COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


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
