"""iNaturalist 2021 linear probe (DINOv2 protocol; 10,000 classes).

  python -m triplane3d.evaluate --config=configs/eval/inat21.py --config.data_dir=$TFDS \
      --config.backbones=... --workdir=/tmp/eval_inat

Needs i_naturalist2021 (train, val) in ArrayRecord format. Paper (ViT-B/14): 81.1 -> 82.0.
Not run here (no iNat21 on this machine); 2.7M training images.
"""

from triplane3d.configs.eval import common


def get_config():
  c = common.get_base_config()
  c.suites = 'inat21'
  return c
