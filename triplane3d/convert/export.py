"""Export a (fine-tuned) backbone back to DINOv2's official PyTorch format.

The result loads into the official `dinov2_vit*14` hub models with `load_state_dict` and into
`triplane3d.convert.load_dinov2`: the round trip is lossless because the 37×37 positional table
is the parameter (never a resized copy).
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from triplane3d.convert import keys as keys_lib


def to_dinov2_state_dict(params: dict) -> dict[str, np.ndarray]:
  """Backbone params (nested dict, numpy or jax arrays) → official-key float32 numpy dict."""
  host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  return keys_lib.flax_to_official(host)


def save_dinov2(params: dict, path: str) -> None:
  """Writes official-key weights to `.safetensors` (no torch needed) or `.pth` (torch).

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

      torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp)
    else:
      raise ValueError(f'unknown export format {path!r}: use .safetensors or .pth.')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
