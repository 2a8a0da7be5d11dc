"""The "no triplane" conv decoder: shapes, output ranges, logical axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from triplane3d.configs import common, demo
from triplane3d.models.conv_decoder import ConvDecoder


def _from_config(cfg):
  return ConvDecoder.from_config(
    cfg.decoder, resolution=cfg.render.resolution, near=cfg.camera.near, far=cfg.camera.far
  )


def test_demo_config_outputs_rgb_and_depth_in_range():
  cfg = demo.get_config()
  model = _from_config(cfg)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 1 + 16, 96)) * 3  # 56 px / 14 = 4×4 grid.
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), h)
  for leaf in jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
  rgb, depth = jax.jit(model.apply)(variables, h)
  assert rgb.shape == (2, 32, 32, 3) and depth.shape == (2, 32, 32, 1)
  assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
  assert float(depth.min()) >= cfg.camera.near and float(depth.max()) <= cfg.camera.far
  assert float(jnp.std(depth)) > 0


def test_default_config_reaches_256():
  cfg = common.get_base_config()
  model = _from_config(cfg)
  h = jax.ShapeDtypeStruct((1, 257, 3072), jnp.float32)
  rgb, depth = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.PRNGKey(0), h), h)
  assert rgb.shape == (1, 256, 256, 3) and depth.shape == (1, 256, 256, 1)


def test_non_square_grid_is_refused():
  with pytest.raises(ValueError, match='square'):
    ConvDecoder(width=8, up_channels=(8,), resolution=8).init(
      jax.random.PRNGKey(0), np.zeros((1, 1 + 6, 4), np.float32)
    )
