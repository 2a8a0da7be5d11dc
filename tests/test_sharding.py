"""Tests for triplane3d/sharding.py on 8 fake CPU devices (see conftest.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from triplane3d import sharding


def _cfg(data, fsdp):
  return mlc.ConfigDict({'data': data, 'fsdp': fsdp})


@pytest.mark.parametrize(
  'data,fsdp,shape',
  [(-1, 1, (8, 1)), (4, 2, (4, 2)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (1, 8, (1, 8))],
)
def test_make_mesh_shapes(devices, data, fsdp, shape):
  mesh = sharding.make_mesh(_cfg(data, fsdp))
  assert mesh.axis_names == ('data', 'fsdp')
  assert (mesh.shape['data'], mesh.shape['fsdp']) == shape
  # Auto, deliberately: jit in/out shardings plus compiler propagation inside the model.
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize(
  'data,fsdp,needle',
  [
    (3, 2, 'must equal the device count 8'),
    (-1, -1, 'at most one of mesh.data / mesh.fsdp'),
    (-1, 3, 'cannot be split into groups of 3'),
    (0, 8, 'mesh.data must be a positive size'),
  ],
)
def test_make_mesh_refuses(devices, data, fsdp, needle):
  with pytest.raises(ValueError, match=r'mesh\.data=.*mesh\.fsdp=.*8 devices') as e:
    sharding.make_mesh(_cfg(data, fsdp))
  assert needle in str(e.value)


def test_make_mesh_on_a_device_subset(devices):
  mesh = sharding.make_mesh(_cfg(-1, 2), devices=devices[:4])
  assert mesh.shape == {'data': 2, 'fsdp': 2}


def test_check_batch(devices):
  mesh = sharding.make_mesh(_cfg(4, 2))
  sharding.check_batch(16, mesh, process_count=2)
  with pytest.raises(ValueError, match=r'batch_size=12 .* data × fsdp = 4 × 2 = 8'):
    sharding.check_batch(12, mesh, process_count=1)
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    sharding.check_batch(8, sharding.make_mesh(_cfg(-1, 1)), process_count=3)


def test_logical_spec_matches_flax_and_checks_divisibility(devices):
  mesh = sharding.make_mesh(_cfg(4, 2))
  cases = [
    (('embed', 'mlp'), (8, 32)),
    (('mlp', 'embed'), (32, 8)),
    (('embed', 'qkv', 'heads', 'kv'), (8, 3, 2, 4)),
    (('act_batch', 'tokens', 'embed'), (16, 5, 8)),
    (('conv_in', 'channels'), (4, 6)),
    ((None, 'mlp'), (3, 6)),
  ]
  for names, shape in cases:
    ours = sharding.logical_to_mesh_spec(names, shape, mesh)
    theirs = nn.logical_to_mesh_axes(names, sharding.RULES)
    assert NamedSharding(mesh, ours).is_equivalent_to(NamedSharding(mesh, theirs), len(shape))
  # The documented difference: an indivisible dim is replicated; 'mlp' takes over 'fsdp'.
  assert sharding.logical_to_mesh_spec(('embed', 'mlp'), (7, 32), mesh) == P(None, 'fsdp')
  assert sharding.logical_to_mesh_spec(('embed', 'mlp'), (7, 5), mesh) == P()
  assert sharding.logical_to_mesh_spec(('act_batch', 'embed'), (6, 8), mesh) == P(None, 'fsdp')
  assert sharding.logical_to_mesh_spec(None, (3,), mesh) == P()


class _Mlp(nn.Module):
  """A two-layer MLP named the way the model code names its axes."""

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    h = nn.Dense(
      16,
      kernel_init=nn.with_logical_partitioning(init, ('embed', 'mlp')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)),
    )(x)
    h = nn.with_logical_constraint(nn.gelu(h), ('act_batch', 'mlp'))
    y = nn.Dense(8, kernel_init=nn.with_logical_partitioning(init, ('mlp', 'embed')))(h)
    scale = self.param(
      'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)), (8,)
    )
    odd = self.param('odd', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)), (3,))
    plain = self.param('plain', nn.initializers.zeros, (2,))
    return y * scale + odd.sum() + plain.sum()


def test_logical_to_shardings_on_boxed_params(devices):
  mesh = sharding.make_mesh(_cfg(4, 2))
  x = jnp.ones((16, 8))
  abstract = jax.eval_shape(_Mlp().init, jax.random.key(0), x)
  sh = sharding.logical_to_shardings(abstract, mesh)['params']
  assert sh['Dense_0']['kernel'].spec == P('fsdp')
  assert sh['Dense_0']['bias'].spec == P('fsdp')
  assert sh['Dense_1']['kernel'].spec == P(None, 'fsdp')
  assert sh['Dense_1']['bias'].spec == P()  # No names: replicated.
  assert sh['scale'].spec == P('fsdp')
  assert sh['odd'].spec == P()  # 3 is not divisible by fsdp=2.
  assert sh['plain'].spec == P()
  # Same structure as the unboxed params; nn.get_partition_spec trees work too.
  assert jax.tree.structure(sh) == jax.tree.structure(nn.unbox(abstract)['params'])
  from_specs = sharding.logical_to_shardings(nn.get_partition_spec(abstract), mesh)['params']
  assert from_specs['Dense_1']['kernel'].spec == P(None, 'fsdp')


def test_adam_state_follows_params_through_a_jitted_step(devices):
  """After a step with explicit in/out shardings, mu/nu carry the params' shardings and the
  sharded step equals the single-device one."""
  mesh = sharding.make_mesh(_cfg(4, 2))
  model, opt = _Mlp(), optax.adam(1e-2)
  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = jax.random.normal(jax.random.key(2), (16, 8))

  def make_state(rng):
    params = nn.unbox(model.init(rng, x))['params']
    return {'step': jnp.int32(0), 'params': params, 'opt_state': opt.init(params)}

  def train_step(state, x, y):
    def loss_fn(p):
      return jnp.mean((model.apply({'params': p}, x) - y) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state['params'])
    upd, opt_state = opt.update(g, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], upd)
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, loss

  param_sh = sharding.logical_to_shardings(jax.eval_shape(model.init, jax.random.key(0), x), mesh)
  abstract_state = jax.eval_shape(make_state, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract_state, param_sh['params'], mesh)
  adam = state_sh['opt_state'][0]
  assert adam.mu['Dense_0']['kernel'].spec == P('fsdp')
  assert adam.nu['Dense_1']['kernel'].spec == P(None, 'fsdp')
  assert adam.count.spec == P()
  assert state_sh['step'].spec == P()

  with nn.logical_axis_rules(sharding.RULES):
    state = jax.jit(make_state, out_shardings=state_sh)(jax.random.key(0))
    bsh = sharding.batch_sharding(mesh)
    step = jax.jit(
      train_step,
      in_shardings=(state_sh, bsh, bsh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    ref_state = jax.device_put(make_state(jax.random.key(0)), jax.devices()[0])
    ref_step = jax.jit(train_step)
    for _ in range(2):
      state, loss = step(state, jax.device_put(x, bsh), jax.device_put(y, bsh))
      ref_state, ref_loss = ref_step(ref_state, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)

  for leaf, want, ref in zip(
    jax.tree.leaves(state), jax.tree.leaves(state_sh), jax.tree.leaves(ref_state), strict=True
  ):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)
    np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-5, atol=1e-6)
  mu = state['opt_state'][0].mu
  assert mu['Dense_0']['kernel'].sharding.spec == state['params']['Dense_0']['kernel'].sharding.spec


def test_shard_like_and_abstract_with_shardings(devices):
  mesh = sharding.make_mesh(_cfg(4, 2))
  tree = {'w': np.arange(32.0).reshape(8, 4), 'b': np.zeros(3, np.float32)}
  shs = {'w': NamedSharding(mesh, P('data', 'fsdp')), 'b': sharding.replicated(mesh)}
  placed = sharding.shard_like(tree, shs)
  assert placed['w'].sharding == shs['w']
  np.testing.assert_array_equal(placed['w'], tree['w'])
  ab = sharding.abstract_with_shardings(placed, shs)
  assert ab['w'].shape == (8, 4) and ab['w'].sharding == shs['w']
  assert ab['b'].dtype == np.float32 and ab['b'].sharding == shs['b']


def test_state_shardings_matches_path_suffixes_and_checks_fit(devices):
  mesh = sharding.make_mesh(_cfg(4, 2))
  fsdp = NamedSharding(mesh, P(None, 'fsdp'))
  param_sh = {'enc': {'kernel': fsdp}}
  f32 = jnp.float32
  state = {
    'params': {'enc': {'kernel': jax.ShapeDtypeStruct((3, 8), f32)}},
    'opt': {'mu': {'enc': {'kernel': jax.ShapeDtypeStruct((3, 8), f32)}}},
    'stats': {'enc': {'kernel': jax.ShapeDtypeStruct((3, 5), f32)}},  # Does not divide.
    'kernel': jax.ShapeDtypeStruct((3, 8), f32),  # Only a partial path: no match.
  }
  got = sharding.state_shardings(state, param_sh, mesh)
  assert got['params']['enc']['kernel'] == fsdp and got['opt']['mu']['enc']['kernel'] == fsdp
  assert got['stats']['enc']['kernel'].spec == P() and got['kernel'].spec == P()


def test_to_global_shards_batch_over_mesh(devices):
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'), devices=devices)
  batch = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3), 'y': np.arange(16)}
  g = sharding.to_global(batch, mesh)
  assert g['x'].shape == (16, 3) and len(g['x'].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(g['x']), batch['x'])
  assert g['x'].addressable_shards[0].data.shape == (2, 3)
