"""Export a backbone as a Hugging Face `transformers` model directory.

`save_hf(params, 'out_dir')` writes `config.json` + `model.safetensors` in the hub layout (the
files `facebook/dinov2-*` ship), so `transformers.Dinov2Model.from_pretrained('out_dir')` (or
`Dinov2WithRegistersModel` for `_reg` variants) loads it with no missing or unexpected keys.
Writing it needs neither torch nor transformers.

The architecture is fully described by the config; one behaviour is not: for non-register
models, transformers resizes the 37×37 positional table by target size, without DINOv2's
`(n + 0.1) / 37` scale factor. The exported model's features therefore equal DINOv2's (and
ours) at 518 px, where nothing is resized, and equal `vit.create(variant,
interpolate_offset=0.0)` at other sizes (tests/convert/test_export_hf.py measures both).
Register models resize the same way in all three.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from triplane3d.convert import keys as keys_lib
from triplane3d.models import vit

CONFIG, WEIGHTS = 'config.json', 'model.safetensors'


def chmod_as_created(path: str, mode: int) -> None:
  """Gives `path` the permissions a plain open/mkdir with `mode` would (`mode` & ~umask):
  tempfile makes its files and directories private, which a renamed export should not be."""
  umask = os.umask(0)  # The only way to read the umask is to set it.
  os.umask(umask)
  os.chmod(path, mode & ~umask)


def hf_config(model: vit.DinoViT) -> dict:
  """The `config.json` dict that makes transformers rebuild `model`'s architecture."""
  regs = model.num_registers > 0
  ratio = model.mlp_ratio
  config = {
    'architectures': ['Dinov2WithRegistersModel' if regs else 'Dinov2Model'],
    'model_type': 'dinov2_with_registers' if regs else 'dinov2',
    'hidden_size': model.width,
    'num_hidden_layers': model.depth,
    'num_attention_heads': model.num_heads,
    # transformers computes the hidden size as int(width * mlp_ratio), as DINOv2 does.
    'mlp_ratio': int(ratio) if float(ratio).is_integer() else ratio,
    'hidden_act': 'gelu',  # Exact (erf) GELU, as torch's nn.GELU().
    'hidden_dropout_prob': 0.0,
    'attention_probs_dropout_prob': 0.0,
    'drop_path_rate': 0.0,
    'initializer_range': 0.02,
    'layer_norm_eps': 1e-6,
    # The positional table covers image_size / patch_size patches per side (37 at 518 px).
    'image_size': model.pos_grid * model.patch_size,
    'patch_size': model.patch_size,
    'num_channels': 3,
    'qkv_bias': True,
    'layerscale_value': model.layerscale_init,  # Only an initial value: lambda1 is loaded.
    'use_swiglu_ffn': model.ffn == 'swiglu',
    'dtype': 'float32',
  }
  if regs:
    config['num_register_tokens'] = model.num_registers
  else:
    config['use_mask_token'] = True
  return config


def save_hf(params: dict, path: str, model: vit.DinoViT | None = None) -> int:
  """Writes backbone params as a Hugging Face model directory at `path`; returns the number of
  tensors written.

  Args:
    params: the backbone's nested params (numpy or jax arrays), as `vit.create(...)` builds.
    path: the output directory; an existing one is replaced (callers decide whether to allow
      that). It is written under a temporary name and renamed, so a crash never leaves half a
      model behind.
    model: the `DinoViT` the params belong to (for the heads count, which shapes do not
      tell); None: the variant is inferred from the shapes.
  """
  from safetensors.numpy import save_file

  from triplane3d.convert import load as load_lib

  state = keys_lib.flax_to_official(jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  model = model or vit.create(load_lib.infer_variant(state))
  tensors = {k: np.ascontiguousarray(v) for k, v in keys_lib.official_to_hf(state).items()}
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={'format': 'pt'})
    with open(os.path.join(tmp, CONFIG), 'w') as f:
      json.dump(hf_config(model), f, indent=2, sort_keys=True)
    chmod_as_created(tmp, 0o777)  # mkdtemp makes the directory private (0700).
    if os.path.lexists(path):  # A directory cannot be os.replace'd onto: move the old aside.
      aside = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.old')
      os.rename(path, os.path.join(aside, 'old'))
      os.rename(tmp, path)
      shutil.rmtree(aside)
    else:
      os.rename(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return len(tensors)
