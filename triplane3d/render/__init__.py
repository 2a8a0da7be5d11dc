"""Framework-free rendering: the fixed camera, ray sampling, triplane lookup, ray marching.

Everything here is a pure function of arrays (numpy or jax.numpy); no Flax.
"""

from triplane3d.render.camera import Camera, ray_table
from triplane3d.render.marching import activate_density, raymarch
from triplane3d.render.pdf import sample_pdf
from triplane3d.render.planes import plane_coords, sample_planes, sample_planes_mean
from triplane3d.render.renderer import (
  RenderOptions,
  RenderOutput,
  draw_rays,
  gather_pixels,
  render_batch,
  render_image,
  render_rays,
  to_image,
)
from triplane3d.render.sampling import importance_bins, smooth_weights, stratified_depths

__all__ = [
  'Camera',
  'RenderOptions',
  'RenderOutput',
  'activate_density',
  'draw_rays',
  'gather_pixels',
  'importance_bins',
  'plane_coords',
  'ray_table',
  'raymarch',
  'render_batch',
  'render_image',
  'render_rays',
  'sample_pdf',
  'sample_planes',
  'sample_planes_mean',
  'smooth_weights',
  'stratified_depths',
  'to_image',
]
