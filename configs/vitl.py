"""3D-Prior on ViT-L/14.

  python -m triplane3d.main --config=configs/vitl.py --workdir=DIR \
    --config.model.init_from=facebook/dinov2-large --config.data.data_dir=TFDS_DIR

Same recipe as vitb.py. The student, its Adam state and the frozen teacher are sharded over
`mesh.fsdp` (4 by default here) to fit chips with 16 GiB of HBM. Wall time and the per-chip
fit are not yet measured by us.
"""

from triplane3d.configs import common


def get_config():
  c = common.get_base_config()
  c.model.variant = 'vitl14'
  c.model.init_from = 'facebook/dinov2-large'
  c.mesh.fsdp = 4
  return c
