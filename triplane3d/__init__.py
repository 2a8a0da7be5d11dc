"""triplane3d."""

from triplane3d import xla_gpu as _xla_gpu

# Before any jax backend starts: XLA reads XLA_FLAGS once (see triplane3d/xla_gpu.py).
_xla_gpu.apply()
