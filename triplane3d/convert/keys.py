"""Name and layout mapping between DINOv2 checkpoints and `DinoViT` parameters.

Three naming schemes meet here:
* official DINOv2 keys (`blocks.3.attn.qkv.weight`, ...), PyTorch layouts;
* Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` keys as saved on the hub
  (`encoder.layer.3.attention.attention.query.weight`, ...), with q, k, v split;
* our Flax parameter tree (`blocks_3/attn/qkv/kernel`), with (in, out) Dense kernels and
  (kh, kw, in, out) conv kernels.

Everything is normalised to official keys first (`hf_to_official`), then laid out for Flax
(`official_to_flax`); `flax_to_official` and `official_to_hf` invert them for export.
"""

from __future__ import annotations

import re

import numpy as np

# Official leaf name → Flax leaf name, for Linears and the patch conv. The layouts change in the
# code below: a Linear weight (out, in) → (in, out), the conv weight (D, 3, p, p) → (p, p, 3, D).
_LEAF = {
  'weight': 'kernel',
  'bias': 'bias',
}
_NORM_LEAF = {'weight': 'scale', 'bias': 'bias'}

_BLOCK_RE = re.compile(r'^blocks\.(?:\d+\.)?(\d+)\.(.+)$')  # Also chunked `blocks.0.7.`.


def official_to_flax(state: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
  """Maps official DINOv2 tensors to a nested Flax params dict.

  Returns:
    `(params, unexpected)`: the nested dict, and the keys that have no place in a `DinoViT`.
  """
  params: dict = {}
  unexpected = []

  def put(path: tuple[str, ...], value: np.ndarray):
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value

  for key, val in state.items():
    val = np.asarray(val)
    if key in ('cls_token', 'pos_embed', 'register_tokens', 'mask_token'):
      put((key,), val)
    elif key in ('patch_embed.proj.weight', 'patch_embed.proj.bias'):
      leaf = key.rsplit('.', 1)[1]
      put(('patch_embed', _LEAF[leaf]), val.transpose(2, 3, 1, 0) if leaf == 'weight' else val)
    elif key in ('norm.weight', 'norm.bias'):
      put(('norm', _NORM_LEAF[key.rsplit('.', 1)[1]]), val)
    elif m := _BLOCK_RE.match(key):
      blk, rest = f'blocks_{m.group(1)}', m.group(2)
      parts = rest.split('.')
      if rest in ('ls1.gamma', 'ls2.gamma'):
        put((blk, parts[0], 'gamma'), val)
      elif parts[0] in ('norm1', 'norm2') and len(parts) == 2 and parts[1] in _NORM_LEAF:
        put((blk, parts[0], _NORM_LEAF[parts[1]]), val)
      elif len(parts) == 3 and (parts[0], parts[1]) in _LINEARS and parts[2] in _LEAF:
        put((blk, parts[0], parts[1], _LEAF[parts[2]]), val.T if parts[2] == 'weight' else val)
      else:
        unexpected.append(key)
    else:
      unexpected.append(key)
  return params, unexpected


_LINEARS = {('attn', 'qkv'), ('attn', 'proj'), ('mlp', 'fc1'), ('mlp', 'fc2'), ('mlp', 'w12'),
            ('mlp', 'w3')}  # fmt: skip


def flax_to_official(params: dict) -> dict[str, np.ndarray]:
  """Inverse of `official_to_flax`: a nested params dict → official DINOv2 state dict."""
  out: dict[str, np.ndarray] = {}
  inv_norm = {v: k for k, v in _NORM_LEAF.items()}
  for name, node in params.items():
    if name in ('cls_token', 'pos_embed', 'register_tokens', 'mask_token'):
      out[name] = np.asarray(node)
    elif name == 'patch_embed':
      out['patch_embed.proj.weight'] = np.asarray(node['kernel']).transpose(3, 2, 0, 1)
      out['patch_embed.proj.bias'] = np.asarray(node['bias'])
    elif name == 'norm':
      for leaf, v in node.items():
        out[f'norm.{inv_norm[leaf]}'] = np.asarray(v)
    elif name.startswith('blocks_'):
      i = name.split('_', 1)[1]
      for sub, subnode in node.items():
        if sub in ('ls1', 'ls2'):
          out[f'blocks.{i}.{sub}.gamma'] = np.asarray(subnode['gamma'])
        elif sub in ('norm1', 'norm2'):
          for leaf, v in subnode.items():
            out[f'blocks.{i}.{sub}.{inv_norm[leaf]}'] = np.asarray(v)
        else:  # attn / mlp
          for lin, leaves in subnode.items():
            out[f'blocks.{i}.{sub}.{lin}.weight'] = np.asarray(leaves['kernel']).T
            out[f'blocks.{i}.{sub}.{lin}.bias'] = np.asarray(leaves['bias'])
    else:
      raise KeyError(f'parameter {name!r} is not part of a DINOv2 backbone.')
  return out


# Hugging Face (hub layout, also what transformers 5 `save_pretrained` writes; plus the
# in-memory transformers-5 names, in case someone saved a raw `state_dict()`).
_HF_SIMPLE = {
  'embeddings.cls_token': 'cls_token',
  'embeddings.mask_token': 'mask_token',
  'embeddings.position_embeddings': 'pos_embed',
  'embeddings.register_tokens': 'register_tokens',
  'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
  'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
  'layernorm.weight': 'norm.weight',
  'layernorm.bias': 'norm.bias',
}
_HF_LAYER = {
  'norm1': 'norm1',
  'norm2': 'norm2',
  'layer_scale1.lambda1': 'ls1.gamma',
  'layer_scale2.lambda1': 'ls2.gamma',
  'attention.output.dense': 'attn.proj',
  'attention.o_proj': 'attn.proj',
  'mlp.fc1': 'mlp.fc1',
  'mlp.fc2': 'mlp.fc2',
  'mlp.weights_in': 'mlp.w12',
  'mlp.weights_out': 'mlp.w3',
  'mlp.down_proj': 'mlp.w3',
}
# Split projections that are concatenated (along the output axis) into one official tensor.
_HF_FUSED = {
  'attn.qkv': (
    ('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
    ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
  ),
  'mlp.w12': (('mlp.gate_proj', 'mlp.up_proj'),),
}
_HF_LAYER_RE = re.compile(r'^(?:dinov2\.)?encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$')


def hf_to_official(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames Hugging Face DINOv2 tensors to official keys (fusing q/k/v into qkv).

  Returns:
    `(official_state, unexpected_keys)`.
  """
  out: dict[str, np.ndarray] = {}
  unexpected: list[str] = []
  pending: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  fused_parts = {
    part: (target, group)
    for target, groups in _HF_FUSED.items()
    for group in groups
    for part in group
  }
  for key, val in state.items():
    k = key.removeprefix('dinov2.')
    if k in _HF_SIMPLE:
      out[_HF_SIMPLE[k]] = val
      continue
    m = _HF_LAYER_RE.match(k)
    if not m:
      unexpected.append(key)
      continue
    i, mod, leaf = m.groups()
    if leaf == 'lambda1':
      mod, leaf = f'{mod}.lambda1', ''
    if mod in _HF_LAYER:
      tgt = _HF_LAYER[mod]
      out[f'blocks.{i}.{tgt}' + (f'.{leaf}' if leaf else '')] = val
    elif mod in fused_parts:
      target, group = fused_parts[mod]
      pending.setdefault((f'blocks.{i}.{target}.{leaf}', '|'.join(group)), {})[mod] = val
    else:
      unexpected.append(key)
  for (target, group_key), parts in pending.items():
    group = group_key.split('|')
    missing = [g for g in group if g not in parts]
    if missing:
      raise KeyError(f'checkpoint has {sorted(parts)} but not {missing} needed to build {target}.')
    out[target] = np.concatenate([np.asarray(parts[g]) for g in group], axis=0)
  return out, unexpected


# The hub layout is what `from_pretrained` converts from, in every transformers version we
# know; the in-memory names (`q_proj`, `gate_proj`, ...) are a transformers-5 detail.
_HF_OUT_LAYER = {
  'norm1': 'norm1',
  'norm2': 'norm2',
  'ls1.gamma': 'layer_scale1.lambda1',
  'ls2.gamma': 'layer_scale2.lambda1',
  'attn.proj': 'attention.output.dense',
  'mlp.fc1': 'mlp.fc1',
  'mlp.fc2': 'mlp.fc2',
  'mlp.w12': 'mlp.weights_in',  # Gate then up, as in DINOv2's fused w12: loaded unsplit.
  'mlp.w3': 'mlp.weights_out',
}
_HF_QKV = ('query', 'key', 'value')


def official_to_hf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `hf_to_official`: official DINOv2 tensors → Hugging Face hub keys.

  The fused qkv (output axis ordered q, k, v) is split into `attention.attention.{query,key,
  value}`; everything else is a rename. Raises KeyError for a key with no Hugging Face place.
  """
  simple = {v: k for k, v in _HF_SIMPLE.items()}
  out: dict[str, np.ndarray] = {}
  for key, val in state.items():
    if key in simple:
      out[simple[key]] = val
      continue
    m = _BLOCK_RE.match(key)
    if not m:
      raise KeyError(f'{key!r} has no Hugging Face Dinov2Model counterpart.')
    layer, rest = f'encoder.layer.{m.group(1)}', m.group(2)
    mod, _, leaf = rest.rpartition('.')
    if rest in ('ls1.gamma', 'ls2.gamma'):
      out[f'{layer}.{_HF_OUT_LAYER[rest]}'] = val
    elif mod == 'attn.qkv':
      for name, part in zip(_HF_QKV, np.split(np.asarray(val), 3, axis=0), strict=True):
        out[f'{layer}.attention.attention.{name}.{leaf}'] = part
    elif mod in _HF_OUT_LAYER:
      out[f'{layer}.{_HF_OUT_LAYER[mod]}.{leaf}'] = val
    else:
      raise KeyError(f'{key!r} has no Hugging Face Dinov2Model counterpart.')
  return out
