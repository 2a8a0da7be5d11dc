"""Framework-free rendering: the fixed camera, ray sampling, triplane lookup, ray marching.

Everything here is a pure function of arrays (numpy or jax.numpy); no Flax. This package
exports what the rest of triplane3d uses; the pieces (sampling, planes, pdf, marching) are
imported from their modules.
"""

from triplane3d.render.camera import Camera
from triplane3d.render.renderer import (
  RenderOptions,
  draw_rays,
  gather_pixels,
  render_batch,
  render_image,
  to_image,
)

__all__ = [
  'Camera',
  'RenderOptions',
  'draw_rays',
  'gather_pixels',
  'render_batch',
  'render_image',
  'to_image',
]
