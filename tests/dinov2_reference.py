"""PyTorch DINOv2 references for parity tests: tiny random `transformers` models.

The weights are randomised everywhere (LayerScale far from 1, biases and norms non-trivial) so
that a wrong transpose, bias or scale cannot hide. For non-register models the transformers
positional resize is replaced by DINOv2's own formula (scale factor (n + 0.1) / 37): transformers
5.x resizes by size without the offset, which is not what the released DINOv2 models do.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
import transformers

WIDTH, HEADS, DEPTH = 48, 3, 12


def make_model(registers: bool, swiglu: bool = False, seed: int = 0):
  """A random tiny HF DINOv2 (12 blocks, width 48, 518-px positional table), eval mode."""
  torch.manual_seed(seed)
  common = dict(
    hidden_size=WIDTH,
    num_hidden_layers=DEPTH,
    num_attention_heads=HEADS,
    mlp_ratio=4,
    image_size=518,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act='gelu',
    use_swiglu_ffn=swiglu,
  )
  if registers:
    cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
    model = transformers.Dinov2WithRegistersModel(cfg)
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('lambda1'):
        p.copy_(0.5 + torch.rand_like(p))  # LayerScale well away from 1e-5 / 1.
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)))
  model.eval()
  if not registers:
    _use_dinov2_pos_resize(model)
  return model


def _use_dinov2_pos_resize(model):
  emb = model.embeddings

  def interpolate_pos_encoding(embeddings, height, width):
    pos = emb.position_embeddings
    n, m = embeddings.shape[1] - 1, pos.shape[1] - 1
    if n == m and height == width:
      return pos
    g = int(math.sqrt(m))
    h, w = height // 14, width // 14
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
      grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode='bicubic', align_corners=False
    )
    assert grid.shape[-2:] == (h, w)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)

  emb.interpolate_pos_encoding = interpolate_pos_encoding


def official_state_dict(model) -> dict[str, np.ndarray]:
  """The model's weights under official DINOv2 hub key names (written independently of the
  package's converter, from the two naming schemes)."""
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  out = {
    'cls_token': sd['embeddings.cls_token'],
    'pos_embed': sd['embeddings.position_embeddings'],
    'mask_token': sd['embeddings.mask_token'],
    'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
    'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
    'norm.weight': sd['layernorm.weight'],
    'norm.bias': sd['layernorm.bias'],
  }
  if 'embeddings.register_tokens' in sd:
    out['register_tokens'] = sd['embeddings.register_tokens']
  for i in range(DEPTH):
    p, q = f'encoder.layer.{i}.', f'blocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[q + 'norm1.' + leaf] = sd[p + 'norm1.' + leaf]
      out[q + 'norm2.' + leaf] = sd[p + 'norm2.' + leaf]
      out[q + 'attn.qkv.' + leaf] = np.concatenate(
        [sd[p + f'attention.{x}_proj.' + leaf] for x in 'qkv'], axis=0
      )
      out[q + 'attn.proj.' + leaf] = sd[p + 'attention.o_proj.' + leaf]
      if p + 'mlp.fc1.weight' in sd:
        out[q + 'mlp.fc1.' + leaf] = sd[p + 'mlp.fc1.' + leaf]
        out[q + 'mlp.fc2.' + leaf] = sd[p + 'mlp.fc2.' + leaf]
      else:
        out[q + 'mlp.w12.' + leaf] = np.concatenate(
          [sd[p + 'mlp.gate_proj.' + leaf], sd[p + 'mlp.up_proj.' + leaf]], axis=0
        )
        out[q + 'mlp.w3.' + leaf] = sd[p + 'mlp.down_proj.' + leaf]
    out[q + 'ls1.gamma'] = sd[p + 'layer_scale1.lambda1']
    out[q + 'ls2.gamma'] = sd[p + 'layer_scale2.lambda1']
  return out


@torch.no_grad()
def intermediate_layers(model, images_nhwc: np.ndarray, idx, norm: bool):
  """Per selected block: (patch tokens (B, N, D), class token (B, D)), as numpy."""
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
  hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
  r = 1 + getattr(model.config, 'num_register_tokens', 0)
  outs = []
  for i in idx:
    h = hidden[i + 1]  # hidden_states[0] is the embedding output.
    if norm:
      h = model.layernorm(h)
    outs.append((h[:, r:].numpy(), h[:, 0].numpy()))
  return outs
