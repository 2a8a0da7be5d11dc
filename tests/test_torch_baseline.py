"""benchmarks/torch_baseline.py, the PyTorch step the JAX step is timed against (issue 13).

One step at tiny sizes trains (finite loss, the student, decoder and point MLP move, the
teacher does not), and its renderer is the same maths as `triplane3d.render`: on the same
planes, point-MLP weights and random draws, rgb / depth / opacity / densities agree to 1e-5,
so the comparison times equal work.
"""

import importlib.util
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny import tiny_config

from triplane3d import render
from triplane3d.models.triplane import point_mlp
from triplane3d.render.camera import ray_table
from triplane3d.render.renderer import render_rays

PATH = Path(__file__).parents[1] / 'benchmarks' / 'torch_baseline.py'


@pytest.fixture(scope='module')
def tb():
  spec = importlib.util.spec_from_file_location('torch_baseline', PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules['torch_baseline'] = module  # Dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


def _config(**over):
  base = {
    'train.batch_size': 2, 'model.num_layers_h': 2, 'render.num_coarse': 4,
    'render.num_fine': 4, 'decoder.attention_prior': 'none',
  }  # fmt: skip
  return tiny_config('', **{**base, **over})  # 28 px, 8² rays, 16² × 8 planes.


def test_one_step_trains_the_student_not_the_teacher(tb):
  base = tb.Baseline(_config(), vit_depth=2)
  before = {
    'student': [p.detach().clone() for p in base.student.parameters()],
    'teacher': [p.detach().clone() for p in base.teacher.parameters()],
    'decoder': [p.detach().clone() for p in base.decoder.parameters()],
    'mlp': [p.detach().clone() for p in base.mlp.parameters()],
  }
  loss = base.step(base.batch())
  assert math.isfinite(loss) and loss > 0
  for name in ('student', 'teacher', 'decoder', 'mlp'):
    after = getattr(base, name).parameters()
    moved = [not torch.equal(a, b) for a, b in zip(before[name], after)]
    if name == 'teacher':
      assert not any(moved)
    else:  # Every parameter with a gradient moves; DINOv2's unused mask token does not.
      assert sum(moved) >= len(moved) - 1, (name, moved)


def test_renderer_equals_triplane3d_render(tb):
  config = _config(**{'render.num_coarse': 8, 'render.num_fine': 8})
  spec = tb.RenderSpec.from_config(config)
  options = render.RenderOptions.from_config(
    config.render, render.Camera.from_config(config.camera)
  )
  rng = np.random.default_rng(0)
  c, hidden, side, n = 8, 16, 16, spec.resolution**2
  planes = rng.standard_normal((3, side, side, c)).astype(np.float32)
  mlp = {
    'hidden': {'kernel': rng.standard_normal((c, hidden)) / np.sqrt(c), 'bias': rng.standard_normal(hidden)},
    'out': {'kernel': rng.standard_normal((hidden, 4)) / np.sqrt(hidden), 'bias': rng.standard_normal(4)},
  }  # fmt: skip
  mlp = {k: {a: b.astype(np.float32) for a, b in v.items()} for k, v in mlp.items()}
  jitter = rng.random((n, spec.num_coarse), np.float32)
  u = rng.random((n, spec.num_fine), np.float32)

  origins, dirs = (jnp.asarray(x, jnp.float32) for x in ray_table(options.camera, spec.resolution))
  ref = render_rays(
    jnp.asarray(planes), mlp, origins, dirs, jnp.asarray(jitter), jnp.asarray(u),
    decode_fn=point_mlp, options=options,
  )  # fmt: skip

  rays = spec.rays()
  np.testing.assert_allclose(rays[0].numpy(), origins, atol=1e-6)
  np.testing.assert_allclose(rays[1].numpy(), dirs, atol=1e-6)
  point = tb.PointMLP(c, hidden)
  with torch.no_grad():
    for name in ('hidden', 'out'):
      getattr(point, name).weight.copy_(torch.from_numpy(mlp[name]['kernel'].T.copy()))
      getattr(point, name).bias.copy_(torch.from_numpy(mlp[name]['bias']))
    planes_t = torch.from_numpy(planes).permute(0, 3, 1, 2)[None]  # (1, 3, C, H, W)
    out = tb.render(
      planes_t, point, rays, torch.from_numpy(jitter)[None], torch.from_numpy(u)[None], spec
    )
  for got, want, name in zip(out, ref, ('rgb', 'depth', 'opacity', 'densities')):
    assert got.shape[1:] == want.shape, name
    np.testing.assert_allclose(got[0].numpy(), np.asarray(want), atol=1e-5, err_msg=name)
  # Not a vacuous match: the rays see varied colour, depth and opacity.
  depth = np.asarray(ref[1])
  assert np.std(np.asarray(ref[0])) > 0.01 and np.ptp(depth) > 0.05
  assert 0.05 < float(np.mean(np.asarray(ref[2]))) < 0.99


def test_compare_runs_the_jax_step_in_float32_everywhere(tb):
  """Every computation dtype of the paper config is float32 under `--compare`'s JAX flags, as
  in the torch step (a dtype field added to the config later fails here until it is listed)."""
  from triplane3d import run_config
  from triplane3d.configs import vits

  flags = dict(f.removeprefix('--config.').split('=', 1) for f in tb.JAX_FLOAT32)
  flags = {k: {'False': False, 'True': True}.get(v, v) for k, v in flags.items()}
  config = run_config.apply_overrides(vits.get_config(), flags)
  dtypes = {
    f'{section}.{k}': v
    for section, fields in config.items()
    if hasattr(fields, 'items')
    for k, v in fields.items()
    if k.endswith('dtype')
  }
  assert dtypes and set(dtypes.values()) == {'float32'}, dtypes
  assert config.model.remat is False
