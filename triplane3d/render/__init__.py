"""Framework-free rendering: the fixed camera, ray sampling, triplane lookup, ray marching.

Everything here is a pure function of arrays (numpy or jax.numpy); no Flax.
"""

from triplane3d.render.camera import Camera

__all__ = ['Camera']
