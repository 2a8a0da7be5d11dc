"""TriplaneDecoder, its blocks and the point MLP: shapes, logical axes, float64 references."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import torch

from triplane3d.configs import common, demo
from triplane3d.models.layers import UpsampleBlock, upsample2x_bilinear
from triplane3d.models.triplane import CrossAttentionBlock, PointMLP, TriplaneDecoder, point_mlp

VOCAB = {'embed', 'mlp', 'heads', 'kv', 'channels', 'conv_in', 'spatial', 'tokens', None}


def assert_logically_partitioned(variables):
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim, leaf.names
    assert set(leaf.names) <= VOCAB, leaf.names


def test_demo_config_shapes_axes_and_dtypes():
  cfg = demo.get_config()
  cfg.decoder.dtype = 'bfloat16'
  model = TriplaneDecoder.from_config(cfg.decoder)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 1 + 16, 4 * 48))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), h)
  assert_logically_partitioned(variables)
  params = nn.unbox(variables)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert params['embeddings'].shape == (3 * 16 * 16, 64)
  planes = jax.jit(model.apply)(variables, h)
  assert planes.shape == (2, 3, 32, 32, 16) and planes.dtype == jnp.float32
  assert np.all(np.isfinite(planes))
  # The planes depend on h (cross-attention works) and on which image it is.
  assert float(jnp.abs(planes[0] - planes[1]).max()) > 1e-3


def test_default_config_gives_128x128x32_planes():
  cfg = common.get_base_config()
  model = TriplaneDecoder.from_config(cfg.decoder)
  h = jax.ShapeDtypeStruct((1, 257, 4 * 768), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), h)
  out = jax.eval_shape(model.apply, variables, h)
  assert out.shape == (1, 3, 128, 128, 32)


def np_layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def test_cross_attention_block_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16))
  h = rng.normal(size=(2, 7, 24))
  block = CrossAttentionBlock(num_heads=4)
  variables = block.init(
    jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32), jnp.asarray(h, jnp.float32)
  )
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables)['params'])
  # Non-trivial LayerNorm and bias parameters.
  params = jax.tree.map(lambda a: a + rng.normal(size=a.shape) * 0.1, params)
  got = block.apply(
    {'params': jax.tree.map(jnp.float32, params)},
    jnp.asarray(x, jnp.float32),
    jnp.asarray(h, jnp.float32),
  )

  def proj(z, p):
    return np.einsum('bnd,dhk->bnhk', z, p['kernel']) + p['bias']

  q = proj(np_layer_norm(x, params['norm_q']), params['query'])
  kv_in = np_layer_norm(h, params['norm_kv'])
  k, v = proj(kv_in, params['key']), proj(kv_in, params['value'])
  logits = np.einsum('bqhk,bnhk->bhqn', q, k) / np.sqrt(4)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  ctx = np.einsum('bhqn,bnhk->bqhk', attn, v)
  y = x + np.einsum('bqhk,hkd->bqd', ctx, params['out']['kernel']) + params['out']['bias']
  z = np_layer_norm(y, params['norm_mlp'])
  z = np_gelu(z @ params['fc1']['kernel'] + params['fc1']['bias'])
  want = y + z @ params['fc2']['kernel'] + params['fc2']['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upsample_block_matches_torch():
  x = np.random.default_rng(1).normal(size=(2, 4, 5, 3))
  block = UpsampleBlock(6)
  variables = block.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
  got = block.apply(variables, jnp.asarray(x, jnp.float32))
  p = jax.tree.map(
    lambda a: torch.from_numpy(np.asarray(a, np.float64)), nn.unbox(variables)['params']
  )
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  t = torch.nn.functional.interpolate(t, scale_factor=2, mode='bilinear', align_corners=False)
  t = torch.nn.functional.conv2d(
    t, p['conv']['kernel'].permute(3, 2, 0, 1), p['conv']['bias'], padding=1
  )
  want = torch.nn.functional.gelu(t).permute(0, 2, 3, 1).numpy()
  assert got.shape == (2, 8, 10, 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 4, 5, 3), (1, 1, 3, 2), (1, 2, 1, 1)])
def test_upsample_stencil_and_its_adjoint_match_torch_interpolate(shape):
  """The ×2 stencil and its hand-written backward pass equal torch's bilinear interpolate
  (align_corners=False) and its autograd, in float64, including 1- and 2-pixel sides."""
  rng = np.random.default_rng(5)
  x, ct = rng.normal(size=shape), rng.normal(size=(shape[0], 2 * shape[1], 2 * shape[2], shape[3]))
  with jax.enable_x64():
    got, vjp = jax.vjp(upsample2x_bilinear, jnp.asarray(x))
    (got_grad,) = vjp(jnp.asarray(ct))
  t = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  want = torch.nn.functional.interpolate(t, scale_factor=2, mode='bilinear', align_corners=False)
  (want_grad,) = torch.autograd.grad(want, t, torch.from_numpy(ct).permute(0, 3, 1, 2))
  np.testing.assert_allclose(got, want.detach().permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12)
  np.testing.assert_allclose(got_grad, want_grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12)


def test_shuffle_upsample_block_matches_torch_pixel_shuffle():
  """'shuffle': conv at the input resolution, then torch's depth-to-space order, then GELU."""
  x = np.random.default_rng(3).normal(size=(2, 4, 5, 3))
  block = UpsampleBlock(6, mode='shuffle')
  variables = block.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))
  got = block.apply(variables, jnp.asarray(x, jnp.float32))
  p = jax.tree.map(
    lambda a: torch.from_numpy(np.asarray(a, np.float64)), nn.unbox(variables)['params']
  )
  assert p['conv']['kernel'].shape == (3, 3, 3, 24)
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  t = torch.nn.functional.conv2d(
    t, p['conv']['kernel'].permute(3, 2, 0, 1), p['conv']['bias'], padding=1
  )
  t = torch.nn.functional.pixel_shuffle(t, 2)
  want = torch.nn.functional.gelu(t).permute(0, 2, 3, 1).numpy()
  assert got.shape == (2, 8, 10, 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_upsample_mode_is_checked_at_construction():
  cfg = mlc.ConfigDict(
    {
      'width': 8,
      'num_heads': 2,
      'num_layers': 1,
      'low_res': 4,
      'up_channels': (4,),
      'upsample': 'nearest',
      'plane_channels': 4,
      'dtype': 'float32',
    }
  )
  with pytest.raises(ValueError, match=r"decoder.upsample must be one of .*'nearest'"):
    TriplaneDecoder.from_config(cfg)


def test_shuffle_decoder_gives_the_same_plane_shape():
  h = jnp.asarray(np.random.default_rng(4).normal(size=(2, 1 + 16, 12)), jnp.float32)
  dec = TriplaneDecoder(
    width=8, num_heads=2, low_res=4, up_channels=(6, 5), plane_channels=3, upsample='shuffle'
  )
  planes = dec.apply(dec.init(jax.random.PRNGKey(0), h), h)
  assert planes.shape == (2, 3, 16, 16, 3) and dec.plane_resolution == 16
  assert np.isfinite(np.asarray(planes)).all()


def test_point_mlp_module_equals_pure_function_and_numpy():
  feats = np.random.default_rng(2).normal(size=(50, 8)) * 3
  module = PointMLP(hidden=16)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))
  assert_logically_partitioned(variables)
  params = nn.unbox(variables)['params']
  rgb, raw = module.apply(variables, jnp.asarray(feats, jnp.float32))
  rgb2, raw2 = point_mlp(params, jnp.asarray(feats, jnp.float32))
  np.testing.assert_array_equal(rgb, rgb2)
  np.testing.assert_array_equal(raw, raw2)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.logaddexp(0, feats @ p['hidden']['kernel'] + p['hidden']['bias'])
  x = x @ p['out']['kernel'] + p['out']['bias']
  np.testing.assert_allclose(raw, x[:, :1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rgb, 1.002 / (1 + np.exp(-x[:, 1:])) - 0.001, rtol=1e-5, atol=1e-6)
  assert rgb.shape == (50, 3) and raw.shape == (50, 1)
  assert float(rgb.min()) >= -0.001 and float(rgb.max()) <= 1.001
  assert PointMLP.from_config(demo.get_config().render).hidden == 32


def test_point_mlp_in_bfloat16_computes_in_bfloat16_and_returns_float32():
  feats = jnp.asarray(np.random.default_rng(3).normal(size=(64, 8)) * 3, jnp.float32)
  assert PointMLP.from_config(demo.get_config().render).dtype == jnp.float32  # The demo's.
  module = PointMLP.from_config(common.get_base_config().render)  # The paper configs'.
  assert module.dtype == jnp.bfloat16
  variables = module.init(jax.random.PRNGKey(0), feats[:1])
  rgb, raw = module.apply(variables, feats)
  rgb32, raw32 = point_mlp(nn.unbox(variables)['params'], feats)
  assert rgb.dtype == raw.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: close to float32, and not equal (it did compute in bf16).
  np.testing.assert_allclose(raw, raw32, rtol=0.05, atol=0.05)
  np.testing.assert_allclose(rgb, rgb32, atol=0.02)
  assert not np.array_equal(raw, raw32)
  hlo = jax.jit(module.apply).lower(variables, feats).as_text()
  assert 'bf16' in hlo and 'dot_general' in hlo


def test_remat_keeps_params_outputs_and_gradients():
  """decoder.remat recomputes the upsampling in the backward pass: same parameter tree
  (checkpoints stay compatible), same planes, same gradients; and it is really rematerialised."""
  # In float64: some gradients (e.g. of biases just before a LayerNorm) are sums that cancel
  # to ~1e-5 of their terms, and float32 fusion differences would show there.
  with jax.enable_x64(True):
    _check_remat_matches_plain()


def _check_remat_matches_plain():
  cfg = demo.get_config()
  cfg.decoder.dtype = 'float64'
  plain = TriplaneDecoder.from_config(cfg.decoder)
  cfg.decoder.remat = True
  remat = TriplaneDecoder.from_config(cfg.decoder)
  assert remat.remat and not plain.remat
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 1 + 16, 4 * 48), jnp.float64)
  variables = plain.init(jax.random.PRNGKey(1), h)
  variables_remat = remat.init(jax.random.PRNGKey(1), h)
  assert jax.tree.structure(variables) == jax.tree.structure(variables_remat)
  jax.tree.map(np.testing.assert_array_equal, variables, variables_remat)

  def loss(model):
    return lambda v, h: jnp.sum(jnp.sin(model.apply(v, h)))

  np.testing.assert_allclose(
    jax.jit(remat.apply)(variables, h), jax.jit(plain.apply)(variables, h), rtol=1e-12
  )
  grads = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(variables, h)
  grads_remat = jax.jit(jax.grad(loss(remat), argnums=(0, 1)))(variables, h)
  # Relative to the largest gradient: some are zero up to rounding (the key bias: softmax
  # ignores a shift of the logits), and recomputation may fuse and sum in another order.
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-12 * scale), grads_remat, grads
  )
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(variables, h))
  assert 'remat' in jaxpr
  assert 'remat' not in str(jax.make_jaxpr(jax.grad(loss(plain)))(variables, h))
