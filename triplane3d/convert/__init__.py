"""DINOv2 backbones in and out: `load_backbone` / `load_dinov2`, `save_dinov2`, `save_hf`.

The export names load on first use, so that `python -m triplane3d.convert.export` does not
find its own module already imported by this package (runpy warns about that).
"""

from triplane3d.convert.hf import save_hf
from triplane3d.convert.load import WeightFileError, infer_variant, load_backbone, load_dinov2

_EXPORT = ('save_dinov2', 'to_dinov2_state_dict')


def __getattr__(name: str):
  if name in _EXPORT:
    from triplane3d.convert import export

    return getattr(export, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'WeightFileError',
  'infer_variant',
  'load_backbone',
  'load_dinov2',
  'save_dinov2',
  'save_hf',
  'to_dinov2_state_dict',
]
