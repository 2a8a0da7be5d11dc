"""DinoViT parity with DINOv2's PyTorch semantics (through `transformers`), loaded through every
import route, plus positional-embedding interpolation and gradient checks."""

import dinov2_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from triplane3d import convert
from triplane3d.models import pos_embed, vit

SIZES = [(224, 224), (518, 518), (154, 210)]
OVERRIDES = dict(width=ref.WIDTH, num_heads=ref.HEADS)


def _flax_model(registers: bool, swiglu: bool):
  variant = 'vits14_reg' if registers else 'vits14'
  return vit.create(variant, ffn='swiglu' if swiglu else 'mlp', **OVERRIDES)


@pytest.fixture(scope='module', params=[(False, False), (True, True)], ids=['plain', 'reg_swiglu'])
def case(request, tmp_path_factory):
  """A random HF model written in all three formats, and the params each import route gives."""
  registers, swiglu = request.param
  model = ref.make_model(registers, swiglu)
  d = tmp_path_factory.mktemp('ckpt')
  official = ref.official_state_dict(model)
  torch.save({k: torch.from_numpy(v) for k, v in official.items()}, d / 'hub.pth')
  save_file(official, str(d / 'official.safetensors'))
  model.save_pretrained(d / 'hf')
  variant = 'vits14_reg' if registers else 'vits14'
  routes = {
    name: convert.load_dinov2(
      str(d / f), variant=variant, ffn=('swiglu' if swiglu else 'mlp'), **OVERRIDES
    )
    for name, f in [('pth', 'hub.pth'), ('safetensors', 'official.safetensors'), ('hf', 'hf')]
  }
  return model, _flax_model(registers, swiglu), routes


def _images(h, w, seed=0):
  return np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)


def test_import_routes_agree(case):
  _, _, routes = case
  leaves = {k: jax.tree_util.tree_leaves_with_path(v) for k, v in routes.items()}
  base = leaves['pth']
  for name, other in leaves.items():
    assert [p for p, _ in other] == [p for p, _ in base], name
    for (p, a), (_, b) in zip(base, other, strict=True):
      np.testing.assert_array_equal(a, b, err_msg=f'{name}: {p}')


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_parity_with_pytorch(case, size):
  torch_model, model, routes = case
  x = _images(*size)
  variables = {'params': routes['hf' if size[0] == 224 else 'pth']}
  errs = {}
  for kwargs, idx in [
    (dict(n=4, return_class_token=True, norm=True), [8, 9, 10, 11]),
    (dict(n=[2, 5, 8, 11], return_class_token=True, norm=False), [2, 5, 8, 11]),
  ]:
    got = model.apply(variables, x, method='get_intermediate_layers', **kwargs)
    want = ref.intermediate_layers(torch_model, x, idx, kwargs['norm'])
    assert len(got) == len(want)
    for (gp, gc), (wp, wc) in zip(got, want, strict=True):
      assert gp.shape == wp.shape and gc.shape == wc.shape
      errs[str(kwargs['n'])] = max(
        errs.get(str(kwargs['n']), 0.0),
        float(np.abs(np.asarray(gp) - wp).max()),
        float(np.abs(np.asarray(gc) - wc).max()),
      )
  print(f'max |flax - torch| at {size}: {errs}')
  assert max(errs.values()) <= 1e-4, errs


def test_plain_call_and_patch_only_outputs(case):
  _, model, routes = case
  x = _images(224, 224)
  feats = model.apply({'params': routes['pth']}, x)
  (last,) = model.apply({'params': routes['pth']}, x, n=1, method='get_intermediate_layers')
  np.testing.assert_allclose(feats['x_norm_patchtokens'], last, atol=1e-6)
  assert feats['x_norm_clstoken'].shape == (2, ref.WIDTH)
  assert feats['x_norm_regtokens'].shape[1] == model.num_registers


@pytest.mark.parametrize('n', [16, 23, 37, 74])
@pytest.mark.parametrize('registers', [False, True])
def test_pos_interpolation_matches_torch(n, registers):
  g = np.random.default_rng(n).standard_normal((37, 37, 8)).astype(np.float32)
  t = torch.from_numpy(g).permute(2, 0, 1)[None]
  if registers:
    want = F.interpolate(t, size=(n, n + 3), mode='bicubic', align_corners=False, antialias=True)
    got = pos_embed.resize_pos_grid(jnp.asarray(g), n, n + 3, offset=0.0, antialias=True)
  else:
    sf = ((n + 0.1) / 37, (n + 3 + 0.1) / 37)
    want = F.interpolate(t, scale_factor=sf, mode='bicubic', align_corners=False)
    got = pos_embed.resize_pos_grid(jnp.asarray(g), n, n + 3, offset=0.1, antialias=False)
  want = want[0].permute(1, 2, 0).numpy()
  err = float(np.abs(np.asarray(got) - want).max())
  assert got.shape == want.shape
  assert err <= 1e-5, err


def test_jax_resize_is_not_dinov2():
  """Guards the reason `pos_embed` exists: the naive resize is far from DINOv2's."""
  g = np.random.default_rng(0).standard_normal((37, 37, 8)).astype(np.float32)
  naive = jax.image.resize(g, (16, 16, 8), 'cubic', antialias=False)
  exact = pos_embed.resize_pos_grid(jnp.asarray(g), 16, 16, offset=0.1, antialias=False)
  assert float(np.abs(np.asarray(naive) - np.asarray(exact)).max()) > 0.05


def test_gradient_flows_through_interpolated_pos_embed():
  model = vit.create('vit_tiny14')
  params = vit.init_params(model, jax.random.key(0), 56)
  x = jnp.asarray(_images(56, 70))

  def loss(pos):
    p = dict(params, pos_embed=pos)
    (out,) = model.apply({'params': p}, x, n=1, method='get_intermediate_layers')
    return jnp.sum(out**2)

  g = np.asarray(jax.grad(loss)(params['pos_embed']))
  assert np.all(np.isfinite(g))
  assert np.abs(g[0, 1:]).max() > 0  # The patch-grid part receives gradient through resize.


def test_bfloat16_and_remat_close_to_float32():
  m32 = vit.create('vit_tiny14')
  params = vit.init_params(m32, jax.random.key(1), 56)
  x = jnp.asarray(_images(56, 56))
  ref32 = m32.apply({'params': params}, x, n=2, method='get_intermediate_layers')
  bf = vit.create('vit_tiny14', dtype=jnp.bfloat16, remat=True)
  out = bf.apply({'params': params}, x, n=2, method='get_intermediate_layers')
  for a, b in zip(ref32, out, strict=True):
    assert b.dtype == jnp.bfloat16
    rel = float(jnp.abs(a - b.astype(jnp.float32)).max() / jnp.abs(a).max())
    assert rel < 5e-2, rel
  g = jax.grad(lambda p: jnp.sum(bf.apply({'params': p}, x)['x_norm_clstoken'].astype(float)))(
    params
  )
  assert all(np.all(np.isfinite(v)) for v in jax.tree_util.tree_leaves(g))


def test_drop_path_is_stochastic_only_in_training():
  model = vit.create('vit_tiny14', drop_path_rate=0.5)
  params = vit.init_params(model, jax.random.key(0), 56)
  x = jnp.asarray(_images(56, 56))
  det = model.apply({'params': params}, x)
  det2 = model.apply({'params': params}, x)
  np.testing.assert_array_equal(det['x_norm_clstoken'], det2['x_norm_clstoken'])
  train = model.apply(
    {'params': params}, x, deterministic=False, rngs={'dropout': jax.random.key(3)}
  )
  assert not np.allclose(train['x_norm_clstoken'], det['x_norm_clstoken'])


def test_bad_image_size_and_block_index():
  model = vit.create('vit_tiny14')
  params = vit.init_params(model, jax.random.key(0), 56)
  with pytest.raises(ValueError, match='multiple of the patch size'):
    model.apply({'params': params}, jnp.zeros((1, 50, 56, 3)))
  with pytest.raises(ValueError, match='out of range'):
    model.apply(
      {'params': params}, jnp.zeros((1, 56, 56, 3)), n=[7], method='get_intermediate_layers'
    )


def test_every_param_has_logical_axes():
  model = vit.create('vit_tiny14_reg')
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))['params']
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, 'names'))
  assert leaves and all(hasattr(leaf, 'names') for leaf in leaves)
  assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_policies_keep_outputs_and_gradients(policy):
  """model.remat_policy only changes what the backward pass keeps, not the numbers."""
  plain = vit.create('vit_tiny14')
  params = vit.init_params(plain, jax.random.key(1), 56)
  rematted = vit.create('vit_tiny14', remat=True, remat_policy=policy)
  x = jnp.asarray(_images(56, 56))

  def loss(model):
    return lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x)['x_norm_patchtokens']))

  np.testing.assert_allclose(jax.jit(loss(rematted))(params), jax.jit(loss(plain))(params), 1e-6)
  g = jax.jit(jax.grad(loss(plain)))(params)
  g_remat = jax.jit(jax.grad(loss(rematted)))(params)
  # Recomputation may fuse differently: float32 summation order, relative to each array's scale.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max())), g_remat, g
  )
  assert 'remat' in str(jax.make_jaxpr(jax.grad(loss(rematted)))(params))


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match='remat_policy'):
    vit.init_params(vit.create('vit_tiny14', remat=True, remat_policy='dot'), jax.random.key(0), 56)


def test_scanned_blocks_match_pytorch(case):
  """model.scan_blocks: the same parameters, run as one scan, still DINOv2 (remat on too)."""
  torch_model, model, routes = case
  scanned = model.clone(scan_blocks=True, remat=True)
  x = _images(224, 224)
  got = scanned.apply(
    {'params': routes['hf']},
    x,
    method='get_intermediate_layers',
    n=[2, 5, 11],
    return_class_token=True,
    norm=True,
  )
  want = ref.intermediate_layers(torch_model, x, [2, 5, 11], True)
  err = max(
    float(np.abs(np.asarray(g) - w).max())
    for gw, ww in zip(got, want, strict=True)
    for g, w in zip(gw, ww, strict=True)
  )
  assert err <= 1e-4, err
  plain = model.apply({'params': routes['hf']}, x)['x_norm_patchtokens']
  np.testing.assert_allclose(
    scanned.apply({'params': routes['hf']}, x)['x_norm_patchtokens'], plain, atol=1e-5
  )


@pytest.mark.parametrize('remat', [False, True])
def test_scanned_blocks_keep_gradients_and_the_param_tree(remat):
  plain = vit.create('vit_tiny14', remat=remat)
  scanned = vit.create('vit_tiny14', remat=remat, scan_blocks=True)
  params = vit.init_params(plain, jax.random.key(1), 56)
  # init builds the same per-block tree, so checkpoints and converters are unaffected.
  assert jax.tree.structure(vit.init_params(scanned, jax.random.key(1), 56)) == jax.tree.structure(
    params
  )
  x = jnp.asarray(_images(56, 56))

  def loss(model):
    return lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x)['x_norm_patchtokens']))

  g = jax.jit(jax.grad(loss(plain)))(params)
  g_scan = jax.jit(jax.grad(loss(scanned)))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max())), g_scan, g
  )
  text = jax.jit(jax.grad(loss(scanned))).lower(params).as_text()
  assert text.count('stablehlo.while') == 2  # One scan forward, one backward: not 12 blocks.

  # The trainer's path: the last 4 blocks' outputs, from two scans (8 blocks, then 4 collected).
  def h_loss(model):
    def f(p):
      outs = model.apply(
        {'params': p}, x, n=4, return_class_token=True, method='get_intermediate_layers'
      )
      return sum(jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(c)) for a, c in outs)

    return f

  g = jax.jit(jax.grad(h_loss(plain)))(params)
  g_scan = jax.jit(jax.grad(h_loss(scanned)))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max())), g_scan, g
  )


def test_scanned_blocks_refuse_drop_path_in_training():
  model = vit.create('vit_tiny14', scan_blocks=True, drop_path_rate=0.1)
  x = jnp.asarray(_images(56, 56))
  params = vit.init_params(model, jax.random.key(0), 56)
  model.apply({'params': params}, x)  # Inference: drop path is off, scanning is fine.
  with pytest.raises(ValueError, match='drop_path_rate=0'):
    model.apply({'params': params}, x, deterministic=False, rngs={'dropout': jax.random.key(1)})


def test_scan_blocks_reaches_the_backbone_from_the_config(tmp_path):
  from tiny import tiny_config

  from triplane3d.models.prior3d import Prior3D

  config = tiny_config(str(tmp_path))
  assert not Prior3D.from_config(config).backbone.scan_blocks
  config.model.scan_blocks = True
  assert Prior3D.from_config(config).backbone.scan_blocks
