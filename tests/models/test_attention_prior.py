"""The camera attention prior points each plane cell at the patches that see it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from triplane3d.configs import demo
from triplane3d.models.attention_prior import camera_attention_bias
from triplane3d.models.prior3d import Prior3D, unbox
from triplane3d.render.camera import Camera

L, G = 8, 4


def _cell_world(cam, i, j):
  """World (x, y) of cell (row i, column j) of the xy plane (independent restatement)."""
  half = cam.box_size / 2
  return (
    cam.box_center[0] + half * (2 * (j + 0.5) / L - 1),
    cam.box_center[1] + half * (2 * (i + 0.5) / L - 1),
  )


def test_xy_cells_attend_to_the_patch_they_project_into():
  cam = Camera()
  bias = camera_attention_bias(cam, 'xyz', L, G)
  assert bias.shape == (3 * L * L, 1 + G * G)
  np.testing.assert_array_equal(bias[:, 0], 0.0)  # The class token: no preference.
  checked = 0
  for i in range(L):
    for j in range(L):
      x, y = _cell_world(cam, i, j)
      z = cam.box_center[2]
      u, v = cam.cx + cam.fx * x / z, cam.cy + cam.fy * y / z
      if not (0 < u < 1 and 0 < v < 1):
        continue
      best = int(np.argmax(bias[i * L + j, 1:]))
      assert divmod(best, G) == (int(v * G), int(u * G)), (i, j, u, v)
      checked += 1
  assert checked >= 16


def test_xz_and_yz_cells_constrain_one_image_axis():
  bias = camera_attention_bias(Camera(), 'xyz', L, G)
  xz = bias[L * L : 2 * L * L, 1:].reshape(L * L, G, G)  # (cell, patch row, patch column)
  yz = bias[2 * L * L :, 1:].reshape(L * L, G, G)
  np.testing.assert_allclose(xz, np.broadcast_to(xz[:, :1, :], xz.shape))  # Any row.
  np.testing.assert_allclose(yz, np.broadcast_to(yz[:, :, :1], yz.shape))  # Any column.
  # A cell further from the camera (larger z) at the same x projects closer to the centre.
  col = xz[:, 0, :].reshape(L, L, G)  # (z row, x column, patch column)
  assert np.argmax(col[0, 0]) <= np.argmax(col[-1, 0])


def test_rotated_camera_is_refused():
  rot = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
  with pytest.raises(ValueError, match='identity rotation'):
    camera_attention_bias(Camera(rotation=rot), 'xyz', L, G)


def test_decoder_with_prior_runs_and_differs():
  cfg = demo.get_config()
  cfg.decoder.attention_prior = 'camera'
  with_prior = Prior3D.from_config(cfg)
  cfg.decoder.attention_prior = 'none'
  without = Prior3D.from_config(cfg)
  params = unbox(with_prior.init(jax.random.key(0)))
  h = jax.random.normal(jax.random.key(1), (2, with_prior.num_tokens, 4 * 64))
  a = with_prior.decoder.apply({'params': params['decoder']}, h)
  b = without.decoder.apply({'params': params['decoder']}, h)  # Same parameters.
  assert a.shape == b.shape and np.all(np.isfinite(a))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  cfg.decoder.attention_prior = 'bogus'
  with pytest.raises(ValueError, match='attention_prior'):
    Prior3D.from_config(cfg)


def test_frustum_cells_attend_to_their_own_image_position():
  # In the frustum space a uv cell *is* an image position: cell (i, j) of an L×L plane lies
  # in patch (i·G // L, j·G // L), whatever the camera's pose.
  rot = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
  bias = camera_attention_bias(Camera(rotation=rot), 'xyz', L, G, 1.0, 'frustum')
  for i in range(L):
    for j in range(L):
      best = int(np.argmax(bias[i * L + j, 1:]))
      assert divmod(best, G) == (i * G // L, j * G // L), (i, j)
  ut = bias[L * L : 2 * L * L, 1:].reshape(L, L, G, G)  # (t row, u column, patch row, column)
  np.testing.assert_allclose(ut, np.broadcast_to(ut[:1, :, :1, :], ut.shape))  # Only u counts.


def test_a_narrower_prior_is_sharper():
  wide = camera_attention_bias(Camera(), 'xyz', L, G, 1.0)
  narrow = camera_attention_bias(Camera(), 'xyz', L, G, 0.5)
  np.testing.assert_allclose(narrow, 4.0 * wide, rtol=1e-6)  # −d²/2σ²: σ/2 → 4× the logits.
  with pytest.raises(ValueError, match='attention_prior_sigma'):
    camera_attention_bias(Camera(), 'xyz', L, G, 0.0)


def test_prior_heads_bias_only_the_first_heads():
  # prior_heads = all heads is the prior everywhere; 0 heads is no prior; in between differs
  # from both (same parameters throughout).
  cfg = demo.get_config()
  model = Prior3D.from_config(cfg)
  params = unbox(model.init(jax.random.key(0)))['decoder']
  h = jax.random.normal(jax.random.key(1), (2, model.num_tokens, 4 * 64))

  def planes(prior='camera', heads=None):
    cfg.decoder.attention_prior, cfg.decoder.attention_prior_heads = prior, heads
    return Prior3D.from_config(cfg).decoder.apply({'params': params}, h)

  every, some = planes(), planes(heads=2)
  np.testing.assert_allclose(planes(heads=cfg.decoder.num_heads), every, atol=1e-6)
  np.testing.assert_allclose(planes(heads=0), planes('none'), atol=1e-6)
  assert float(jnp.max(jnp.abs(some - every))) > 1e-3
  assert float(jnp.max(jnp.abs(some - planes('none')))) > 1e-3
  with pytest.raises(ValueError, match='attention_prior_heads'):
    planes(heads=cfg.decoder.num_heads + 1)
