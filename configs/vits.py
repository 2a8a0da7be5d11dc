"""3D-Prior on ViT-S/14.

  python -m triplane3d.main --config=configs/vits.py --workdir=DIR \
    --config.model.init_from=facebook/dinov2-small --config.data.data_dir=TFDS_DIR

Same recipe as vitb.py (ImageNet-1k + pseudo depth, 224 px, 256² renders, 16 + 16 samples,
Adam 1e-4, batch 512, 10 epochs). Needs roughly half the memory and compute of ViT-B; wall
time not yet measured by us.
"""

from triplane3d.configs import common


def get_config():
  c = common.get_base_config()
  c.model.variant = 'vits14'
  c.model.init_from = 'facebook/dinov2-small'
  return c
