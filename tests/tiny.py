"""Tiny trainer configs: the real code paths (synthetic data on disk, ViT, triplanes, renderer,
orbax, grain) at sizes that run a step in well under a second on CPU."""

from triplane3d import run_config
from triplane3d.configs import demo


def tiny_config(data_dir: str, **overrides):
  """The demo config shrunk further; synthetic data generated once into `data_dir`.

  `overrides` are dotted field paths: tiny_config(d, **{'mesh.fsdp': 2}).
  """
  c = demo.get_config()
  c.model.init_from = ''  # Random initialisation: no file to read, and any size works.
  c.model.img_size = 28
  c.decoder.width = 32
  c.decoder.num_heads = 2
  c.decoder.low_res = 4
  c.decoder.up_channels = (8,)
  c.decoder.plane_channels = 8
  c.render.resolution = 8
  c.render.num_coarse = 6
  c.render.num_fine = 4
  c.render.mlp_hidden = 16
  c.data.data_dir = data_dir
  c.data.num_synthetic = 32
  c.data.num_workers = 0
  c.eval.num_heldout = 0
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every_steps = 1
  c.train.image_every_steps = 0  # No grids: each run would compile a render program for them.
  c.train.ckpt_every_steps = 2
  c.mesh.data = -1
  c.mesh.fsdp = 1
  return run_config.apply_overrides(c, overrides)


def get_config(data_dir: str):
  """For the CLI: `--config=tests/tiny.py:DATA_DIR`."""
  return tiny_config(data_dir)
