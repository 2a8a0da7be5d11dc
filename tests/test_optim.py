"""Learning-rate schedules, clipping and parameter groups of `triplane3d.optim`."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from triplane3d import optim


def _cfg(**kw):
  base = dict(
    name='adam', lr=1e-3, b1=0.9, b2=0.999, weight_decay=0.0, schedule='constant',
    warmup_steps=0, grad_clip_norm=0.0, lr_mults=(('.*', 1.0),),
  )  # fmt: skip
  return mlc.ConfigDict({**base, **kw})


def test_schedules():
  const = optim.schedule(_cfg(), 100)
  assert float(const(0)) == pytest.approx(1e-3) and float(const(99)) == pytest.approx(1e-3)
  cos = optim.schedule(_cfg(schedule='cosine', warmup_steps=10), 110)
  assert float(cos(0)) == 0.0
  assert float(cos(5)) == pytest.approx(5e-4)
  assert float(cos(10)) == pytest.approx(1e-3)
  assert float(cos(60)) == pytest.approx(5e-4, rel=1e-5)  # Half-way through the decay.
  assert float(cos(110)) == pytest.approx(0.0, abs=1e-9)


def _first_moments(opt_state):
  """Adam's mu leaves by parameter path (mu = (1 - b1)·g after one step)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    name = jax.tree_util.keystr(path)
    if '.mu' in name:
      out[name.split('.mu')[1]] = np.asarray(leaf)
  return out


def test_groups_multipliers_and_clipping():
  params = {'backbone': {'w': jnp.ones(3)}, 'decoder': {'w': jnp.ones(3)}}
  grads = {'backbone': {'w': jnp.full(3, 10.0)}, 'decoder': {'w': jnp.full(3, 10.0)}}
  cfg = _cfg(lr_mults=(('backbone/.*', 0.1), ('.*', 1.0)), grad_clip_norm=1.0)
  tx, _ = optim.create(cfg, params, 10)
  updates, state = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr·sign(g); the backbone gets a tenth.
  np.testing.assert_allclose(updates['decoder']['w'], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates['backbone']['w'], -1e-4, rtol=1e-4)
  # The clipped gradient (global norm 1 over both groups) is what Adam's mu saw.
  mu = _first_moments(state)
  for v in mu.values():
    np.testing.assert_allclose(v, 0.1 * 10 / np.sqrt(600), rtol=1e-5)


def test_frozen_groups_neither_move_nor_count_for_clipping():
  params = {'backbone': {'w': jnp.ones(3)}, 'decoder': {'w': jnp.ones(3)}}
  grads = {'backbone': {'w': jnp.full(3, 1e3)}, 'decoder': {'w': jnp.full(3, 10.0)}}
  cfg = _cfg(lr_mults=(('backbone/.*', 0.0), ('.*', 1.0)), grad_clip_norm=1.0)
  tx, _ = optim.create(cfg, params, 10)
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['backbone']['w'], 0.0)
  (mu,) = _first_moments(state).values()  # No Adam statistics for the frozen group.
  np.testing.assert_allclose(mu, 0.1 * 10 / np.sqrt(300), rtol=1e-5)
  masked = optim.trainable_mask(cfg)(grads)
  np.testing.assert_array_equal(masked['backbone']['w'], 0.0)
  np.testing.assert_array_equal(masked['decoder']['w'], 10.0)


def test_adamw_decays_weights():
  params = {'w': jnp.ones(2)}
  tx, _ = optim.create(_cfg(name='adamw', weight_decay=0.5), params, 10)
  updates, _ = tx.update({'w': jnp.zeros(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -1e-3 * 0.5, rtol=1e-5)


def test_bad_settings():
  with pytest.raises(ValueError, match=r"optim.schedule must be 'constant' or 'cosine'"):
    optim.schedule(_cfg(schedule='step'), 10)
  with pytest.raises(ValueError, match=r"optim.name must be 'adam' or 'adamw'"):
    optim.create(_cfg(name='sgd'), {'w': jnp.ones(1)}, 10)
  with pytest.raises(ValueError, match=r"has no effect with Adam; use optim.name='adamw'"):
    optim.create(_cfg(weight_decay=0.1), {'w': jnp.ones(1)}, 10)
  params = {'backbone': {'blocks_0': {'w': jnp.ones(1)}}, 'decoder': {'w': jnp.ones(1)}}
  # A prefix without '/.*' matches no whole name: an error, not a silently ignored rule.
  with pytest.raises(
    ValueError, match=r"rule 'backbone' matches no whole .* write 'backbone/\.\*'"
  ):
    optim.create(_cfg(lr_mults=(('backbone', 0.3), ('.*', 1.0))), params, 10)
  optim.create(_cfg(lr_mults=(('backbone/.*', 0.3), ('.*', 1.0))), params, 10)
  # A rule for a part this model lacks is allowed (config rules outlive ablations).
  optim.create(_cfg(lr_mults=(('decoder/embeddings', 10.0), ('.*', 1.0))), params, 10)
