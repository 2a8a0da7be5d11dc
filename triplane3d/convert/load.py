"""Load DINOv2 weights into `DinoViT` parameters, from every format users have.

`load_dinov2(path)` accepts:
* an official hub `.pth` (read with `torch.load(weights_only=True)`: no pickled code runs);
* a `.safetensors` file with official (or Hugging Face) key names — no torch needed;
* a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` directory (config.json +
  model.safetensors, possibly sharded);
* a Hugging Face hub name such as `facebook/dinov2-base`, downloaded into the usual cache
  when the network allows.

The variant is inferred from tensor shapes unless given; every mismatch raises
`WeightFileError` naming the key, what was expected and what was found.

`load_backbone(source)` is the user-facing entry: it also takes a training run's directory and
returns the model with its params, ready for `get_intermediate_layers`.
"""

from __future__ import annotations

import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from triplane3d.convert import keys as keys_lib
from triplane3d.models import vit


class WeightFileError(ValueError):
  """A DINOv2 weight file (or hub model) that cannot be loaded as the requested backbone.

  About imported weights; a training run's own checkpoints raise
  `checkpoint.CorruptCheckpointError` and friends.
  """


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  try:
    return load_file(path)
  except Exception as e:  # safetensors raises several types for truncated / foreign files.
    raise WeightFileError(f'could not read {path} as safetensors: {e}') from e


def _read_pth(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise WeightFileError(
      f'{path} is a PyTorch checkpoint; reading it needs torch: pip install "triplane3d[torch]", '
      'or convert it to .safetensors.'
    ) from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise WeightFileError(
      f'could not read {path} with torch.load(weights_only=True): {e}. Only plain tensor '
      'state dicts are accepted (pickled code is never executed).'
    ) from e
  # Training checkpoints wrap the backbone; hub files are flat.
  for wrapper in ('teacher', 'model', 'state_dict'):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise WeightFileError(f'{path} does not hold a state dict (found {type(obj).__name__}).')
  state = {}
  for k, v in obj.items():
    if hasattr(v, 'detach'):
      state[re.sub(r'^(module\.)?(backbone\.)?', '', k)] = v.detach().float().cpu().numpy()
  return state


def _read_hf_dir(path: str) -> dict[str, np.ndarray]:
  files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
  if not files:
    raise WeightFileError(
      f'{path} has no .safetensors weights; save the model with save_pretrained(..., '
      'safe_serialization=True).'
    )
  state: dict[str, np.ndarray] = {}
  for f in files:
    state.update(_read_safetensors(os.path.join(path, f)))
  return state


def _download(name: str) -> str:
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise WeightFileError(f'{name!r} is not a local path and huggingface_hub is missing.') from e
  try:
    return snapshot_download(name, allow_patterns=['*.json', '*.safetensors'])
  except Exception as e:
    raise WeightFileError(
      f'could not download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). '
      'Without network access, download it elsewhere and pass the local directory or a '
      '.pth/.safetensors file instead.'
    ) from e


def read_official_state(path: str) -> dict[str, np.ndarray]:
  """Reads any supported source into a state dict with official DINOv2 keys."""
  if not os.path.exists(path):
    if re.fullmatch(r'[\w.-]+/[\w.-]+', path) and not path.startswith(('.', '/')):
      path = _download(path)
    else:
      raise WeightFileError(f'no checkpoint at {path!r} (not a file, directory or hub name).')
  if os.path.isdir(path):
    state = _read_hf_dir(path)
  elif path.endswith('.safetensors'):
    state = _read_safetensors(path)
  elif path.endswith(('.pth', '.pt', '.bin')):
    state = _read_pth(path)
  else:
    raise WeightFileError(f'unknown checkpoint format {path!r}: use .pth, .safetensors or a dir.')
  if any(k.startswith(('embeddings.', 'encoder.', 'dinov2.', 'layernorm.')) for k in state):
    state, unexpected = keys_lib.hf_to_official(state)
    if unexpected:
      raise WeightFileError(f'{path}: unexpected Hugging Face keys {unexpected[:8]}.')
  return state


def infer_variant(state: dict[str, np.ndarray]) -> str:
  """The `vit.VARIANTS` name whose architecture matches an official state dict's shapes."""
  if 'cls_token' not in state:
    raise WeightFileError('checkpoint has no cls_token: not a DINOv2 backbone state dict.')
  width = int(state['cls_token'].shape[-1])
  depth = len({m.group(1) for k in state if (m := keys_lib._BLOCK_RE.match(k))})
  regs = 'register_tokens' in state
  for name in vit.VARIANTS:
    s = vit.variant_spec(name)
    if (s.width, s.depth, s.num_registers > 0) == (width, depth, regs):
      return name
  raise WeightFileError(
    f'no known DINOv2 variant has width {width}, {depth} blocks and registers={regs}; '
    f'pass variant= explicitly (known: {list(vit.VARIANTS)}).'
  )


def _flatten(tree: dict, prefix: str = '') -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    path = f'{prefix}/{k}' if prefix else k
    out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
  return out


def expected_shapes(model: vit.DinoViT) -> dict[str, tuple[int, ...]]:
  """Flattened parameter path → shape for a model, without allocating anything."""
  x = jax.ShapeDtypeStruct((1, model.patch_size, model.patch_size, 3), jnp.float32)
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros(x.shape)), jax.random.key(0))
  from flax import linen as nn

  return {k: tuple(v.shape) for k, v in _flatten(nn.meta.unbox(abstract['params'])).items()}


def load_dinov2(path: str, variant: str | None = None, **model_overrides) -> dict:
  """Reads DINOv2 weights as a nested dict of float32 numpy arrays for `vit.create(variant)`.

  Args:
    path: a .pth / .safetensors file, a Hugging Face directory, or a hub name.
    variant: e.g. 'vitb14' or 'vitl14_reg'; inferred from the shapes when None.
    **model_overrides: `DinoViT` fields that change parameter shapes (e.g. `pos_grid=16` for
      a checkpoint built at 224 px).

  Raises:
    WeightFileError: unreadable file, missing / unexpected keys, or a shape that does not
      match the variant (the message names the key, expected and found shapes).
  """
  state = read_official_state(path)
  return params_from_official(state, variant or infer_variant(state), path, **model_overrides)


def params_from_official(
  state: dict[str, np.ndarray], variant: str, where: str, **model_overrides
) -> dict:
  """Official-key tensors → checked float32 params for `vit.create(variant, **overrides)`.

  `where` names the source in error messages.
  """
  params, unexpected = keys_lib.official_to_flax(state)
  flat = _flatten(params)
  want = expected_shapes(vit.create(variant, **model_overrides))
  if 'mask_token' in want and 'mask_token' not in flat:
    # Only DINOv2's masked-image objective uses it; some exports drop it.
    logging.info('%s has no mask_token; filling zeros (unused by 3D-Prior).', where)
    flat['mask_token'] = np.zeros(want['mask_token'], np.float32)
  missing = sorted(set(want) - set(flat))
  unexpected += sorted(set(flat) - set(want))
  problems = []
  if missing:
    problems.append(f'missing keys {missing[:10]}' + (' ...' if len(missing) > 10 else ''))
  if unexpected:
    problems.append(f'unexpected keys {unexpected[:10]}' + (' ...' if len(unexpected) > 10 else ''))
  for k in sorted(set(want) & set(flat)):
    got = tuple(np.shape(flat[k]))
    if got != want[k]:
      problems.append(f'{k}: expected shape {want[k]} for {variant}, found {got}')
  if problems:
    raise WeightFileError(
      f'{where} does not match DINOv2 {variant}: ' + '; '.join(problems) + '. Check the variant '
      '(or let it be inferred) and that the file is a DINOv2 backbone.'
    )
  out: dict = {}
  for k, v in flat.items():
    node = out
    *parents, leaf = k.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(v, np.float32)
  return out


def backbone_from_checkpoint(workdir: str, step: int | None = None) -> dict:
  """The student backbone params (numpy) of a training run's checkpoint (latest by default)."""
  from triplane3d import checkpoint

  _, params = checkpoint.restore_params(workdir, step)
  return jax.tree_util.tree_map(np.asarray, params['backbone'])


def _run_variant(workdir: str) -> str | None:
  """The backbone variant a training run's stored config names, or None without a config."""
  from triplane3d import run_config

  config = run_config.read(workdir)
  return None if config is None else str(config.model.variant)


def load_backbone(
  source: str, variant: str | None = None, *, step: int | None = None
) -> tuple[vit.DinoViT, dict]:
  """A ready-to-run backbone from a training run, a DINOv2 checkpoint or an export.

  Example:
    model, params = load_backbone('runs/vitb14')  # or 'x.pth', 'x.safetensors', an HF dir
    feats = model.apply({'params': params}, images_bhwc, n=4, method='get_intermediate_layers')

  Args:
    source: a training workdir (its `checkpoints/`: the student backbone of the latest
      checkpoint, or of `step`), a .pth / .safetensors file (official or Hugging Face keys, as
      `save_dinov2` writes), a Hugging Face model directory (as `save_hf` writes) or a hub name.
    variant: the `vit.VARIANTS` name; None: the run's config, else inferred from the shapes.
    step: the checkpoint step of a workdir (default: the latest); only for workdirs.

  Returns:
    `(model, params)`: `vit.create(variant)` (float32) and its nested float32 numpy params.

  Raises:
    WeightFileError: a source that is none of the above, or weights that do not fit.
    FileNotFoundError: a workdir without a finished checkpoint (or without `step`).
  """
  from triplane3d import checkpoint

  is_run = os.path.isdir(os.path.join(source, checkpoint.CHECKPOINTS))
  if step is not None and not is_run:
    raise WeightFileError(f'step={step} needs a training workdir; {source!r} has no checkpoints/.')
  if is_run:
    state = keys_lib.flax_to_official(backbone_from_checkpoint(source, step))
    variant = variant or _run_variant(source) or infer_variant(state)
  elif os.path.isdir(source) and not any(f.endswith('.safetensors') for f in os.listdir(source)):
    raise WeightFileError(
      f'{source} is neither a training workdir (no checkpoints/) nor a Hugging Face model '
      'directory (no .safetensors); pass a run directory, a .pth / .safetensors file, or a '
      'directory written by save_pretrained / `export --format=hf`.'
    )
  else:
    state = read_official_state(source)
    variant = variant or infer_variant(state)
  return vit.create(variant), params_from_official(state, variant, source)
