"""Export a (fine-tuned) backbone to DINOv2's official format or as a Hugging Face model.

  python -m triplane3d.convert.export --workdir=DIR --out=vitb14_3dprior.pth [--step=N]
  python -m triplane3d.convert.export --workdir=DIR --format=hf --out=vitb14_3dprior_hf

takes the student backbone from a training run's latest (or given) checkpoint. `dinov2` (the
default) writes one .pth / .safetensors file that loads into the official `dinov2_vit*14` hub
models with `load_state_dict`; `hf` writes a directory for `transformers`'
`Dinov2Model.from_pretrained` (`Dinov2WithRegistersModel` for `_reg` variants; see `hf.py`).
Both load back with `triplane3d.convert.load_backbone`, losslessly: the 37×37 positional table
is the parameter (never a resized copy).
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import numpy as np

from triplane3d.convert import hf
from triplane3d.convert import keys as keys_lib
from triplane3d.convert import load as load_lib

FORMATS = ('dinov2', 'hf')


def to_dinov2_state_dict(params: dict) -> dict[str, np.ndarray]:
  """Backbone params (nested dict, numpy or jax arrays) → official-key float32 numpy dict."""
  host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  return keys_lib.flax_to_official(host)


def save_dinov2(params: dict, path: str) -> int:
  """Writes official-key weights to `.safetensors` (no torch needed) or `.pth` (torch);
  returns the number of tensors written.

  The file is written to a temporary name and renamed, so a crash never leaves half a file.
  """
  state = {k: np.ascontiguousarray(v) for k, v in to_dinov2_state_dict(params).items()}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
  os.close(fd)
  try:
    if path.endswith('.safetensors'):
      from safetensors.numpy import save_file

      save_file(state, tmp)
    elif path.endswith(('.pth', '.pt')):
      import torch

      torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, tmp)  # Writable.
    else:
      raise ValueError(f'unknown export format {path!r}: use .safetensors or .pth.')
    hf.chmod_as_created(tmp, 0o666)  # mkstemp creates the file private (0600).
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(state)


backbone_from_checkpoint = load_lib.backbone_from_checkpoint  # Its owner is load.py.


def main(argv):
  from absl import app, flags

  from triplane3d import console

  del argv
  console.quiet_libraries()
  f = flags.FLAGS
  if os.path.exists(f.out) and not f.overwrite:
    raise app.UsageError(
      f'{f.out} exists; pass --overwrite to replace it, or choose another --out.'
    )
  model, params = load_lib.load_backbone(f.workdir, step=f.step)
  save = functools.partial(hf.save_hf, model=model) if f.format == 'hf' else save_dinov2
  print(f'wrote {f.out} ({save(params, f.out)} tensors, {f.format} format)')


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
  flags.DEFINE_string(
    'out', None, 'Output .pth / .safetensors file (dinov2) or directory (hf).', required=True
  )
  flags.DEFINE_enum('format', 'dinov2', FORMATS, 'dinov2: official keys; hf: transformers dir.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_bool('overwrite', False, 'Replace --out if it exists.')
  app.run(main)
