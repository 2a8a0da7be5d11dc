"""XLA:GPU flags the renderer needs, set in the environment before jax starts a backend.

The triplane lookup's backward pass (`render.planes._mean_lookup_bwd`) scatter-adds every
sample point's gradient into its 12 texels: per ViT-B/14 paper image, 2M points into
3 × 128² texels, so each texel takes hundreds of float32 atomic adds. jaxlib 0.10.2 and 0.11.0
(0.10.2 is the newest our `jax<0.11` pin allows) ship an LLVM whose NVPTX backend lowers a
float32 atomic add to a compare-and-swap retry loop instead of the native `atom.add.f32`,
because the native one flushes denormals; under that contention the loop is hundreds of
times slower (jax-ml/jax#38806, openxla/xla#46225; fixed by jax 0.11.1, whose LLVM defaults
the option below to on). The hidden LLVM option `-nvptx-allow-ftz-atomics` restores the
native atomic, at the cost of a denormal partial sum flushed to zero (what every jaxlib
before 0.10.2 did).

`apply()` runs on `import triplane3d`: XLA reads `XLA_FLAGS` once, when jax first starts a
backend, so it must come before any jax computation. It changes nothing unless a jax CUDA
plugin of an affected version is installed, the user has not set the option already, and
`TRIPLANE3D_KEEP_XLA_FLAGS` is unset. XLA:CPU compiles in the same process accept the option
(tests/test_xla_gpu.py); a TPU install has no CUDA plugin, so there it is never set. The flag
reaches child processes too, and every float32 atomic add on the GPU then flushes denormal
partial sums (what jaxlib did before 0.10.2).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
from collections.abc import MutableMapping

FTZ_ATOMICS = '-nvptx-allow-ftz-atomics'
EXTRA_OPTIONS = '--xla_backend_extra_options='
AFFECTED = ((0, 10, 2), (0, 11, 0))  # First and last jaxlib with the CAS-loop atomics.
OPT_OUT = 'TRIPLANE3D_KEEP_XLA_FLAGS'
# The PJRT plugin holds the GPU compiler; the -plugin package is pinned to the same version.
CUDA_PLUGINS = ('jax-cuda12-pjrt', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'jax-cuda13-plugin')


def version_tuple(version: str) -> tuple[int, int, int]:
  """(major, minor, patch) of a version string such as '0.10.2' or '0.11.0.dev20260601'."""
  m = re.match(r'(\d+)\.(\d+)\.(\d+)', version)
  if not m:
    raise ValueError(f'not a version: {version!r}')
  return int(m[1]), int(m[2]), int(m[3])


def affected(jaxlib_version: str) -> bool:
  """Whether this jaxlib's GPU compiler emits CAS-loop float32 atomics (see module doc)."""
  return AFFECTED[0] <= version_tuple(jaxlib_version) <= AFFECTED[1]


def with_extra_option(xla_flags: str, option: str) -> str:
  """`xla_flags` with `option` appended to its `--xla_backend_extra_options` list (comma
  separated; the flag is added when absent)."""
  tokens = xla_flags.split()
  for i, token in enumerate(tokens):
    if token.startswith(EXTRA_OPTIONS):
      value = token[len(EXTRA_OPTIONS) :]
      tokens[i] = EXTRA_OPTIONS + (f'{value},{option}' if value else option)
      return ' '.join(tokens)
  return ' '.join([*tokens, EXTRA_OPTIONS + option])


def _installed(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _backend_started() -> bool:
  """Whether jax has already started a backend (and so read XLA_FLAGS) in this process."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # A jax without this private helper: assume not.
    return False


def apply(environ: MutableMapping[str, str] | None = None) -> bool:
  """Adds `-nvptx-allow-ftz-atomics` to XLA_FLAGS where an affected jaxlib runs CUDA.

  Returns whether XLA_FLAGS was changed. Logs a warning, naming the fix, when jax had already
  started a backend, so that the change comes too late for this process.
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, '') not in ('', '0'):
    return False
  cuda = [v for v in map(_installed, CUDA_PLUGINS) if v]
  if not cuda or not affected(cuda[0]):
    return False
  flags = environ.get('XLA_FLAGS', '')
  if FTZ_ATOMICS in flags or re.search(r'--xla_gpu_ftz(=true)?(\s|$)', flags.lower()):
    return False
  environ['XLA_FLAGS'] = with_extra_option(flags, FTZ_ATOMICS)
  if _backend_started():
    logging.warning(
      'jax (CUDA plugin %s) compiles float32 scatter-adds to CAS loops, which makes the '
      "renderer's backward pass very slow on GPU (jax-ml/jax#38806). triplane3d sets "
      "XLA_FLAGS='--xla_backend_extra_options=%s', but jax has already started, so this "
      'process keeps the slow atomics: import triplane3d before running any jax code, or '
      'export that XLA_FLAGS before starting Python, or use jax >= 0.11.1.',
      cuda[0],
      FTZ_ATOMICS,
    )
  return True
