"""Demo: the whole method on synthetic scenes with a tiny ViT, on a laptop CPU.

  python -m triplane3d.main --workdir=/tmp/triplane3d_demo            # this is the default
  python -m triplane3d.main --config=configs/demo.py --workdir=/tmp/triplane3d_demo

Generates a synthetic-scenes dataset (exact depth) into the workdir on first use, trains a
tiny randomly initialised ViT + triplane decoder + renderer for a few hundred steps, and
leaves checkpoints, TensorBoard logs and PNG reconstructions in the workdir. On 2 CPU cores it
takes a few minutes; reconstructions visibly improve (PSNR rises by several dB).
"""

from triplane3d.configs import common


def get_config():
  c = common.get_base_config()
  c.model.variant = 'vit_tiny14'
  c.model.img_size = 56
  c.model.dtype = 'float32'
  c.model.remat = False
  c.decoder.width = 64
  c.decoder.num_heads = 4
  # 16×16 embeddings and one ×2 block give 32² planes: each low-resolution cell covers two
  # rendered pixels (8×8 and two blocks fit colour far slower: docs/reconstruction.md).
  c.decoder.low_res = 16
  c.decoder.up_channels = (32,)
  c.decoder.plane_channels = 16
  c.decoder.dtype = 'float32'
  c.render.resolution = 32
  c.render.num_coarse = 12
  c.render.num_fine = 12
  c.render.mlp_hidden = 32
  c.render.chunk = 0
  c.data.source = 'synthetic'
  c.depth.normalize = 'none'  # Synthetic depth is exact and already in [near, far].
  c.data.num_synthetic = 512
  c.data.num_workers = 0
  c.data.crop_scale = (0.5, 1.0)
  # RGB and depth weighted 1 : 1 (paper: 0.1 : 1). Our depth is in scene units (range 1),
  # so both MSEs have the same scale; at 0.1 : 1 the colour stays near the mean colour
  # (docs/reconstruction.md).
  c.loss.rgb_weight = 1.0
  c.optim.lr = 1e-3
  c.eval.num_heldout = 64
  c.train.batch_size = 16
  c.train.num_steps = 300
  c.train.log_every_steps = 20
  c.train.image_every_steps = 100
  c.train.ckpt_every_steps = 100
  return c
