"""DINOv2 checkpoint import (`load_dinov2`) and export (`save_dinov2`)."""

from triplane3d.convert.export import save_dinov2, to_dinov2_state_dict
from triplane3d.convert.load import CheckpointError, infer_variant, load_dinov2

__all__ = ['CheckpointError', 'infer_variant', 'load_dinov2', 'save_dinov2', 'to_dinov2_state_dict']
