"""Every suite: synthetic, imagenet (+ ImageNet-R, -Sketch), shape_bias, inat21, nyu_depth.

  python -m triplane3d.evaluate --config=configs/eval/all.py --config.data_dir=$TFDS \
      --config.backbones=... --workdir=/tmp/eval_all

Every real dataset is looked up before any work; see the suite files for each one's needs.
The synthetic suite runs at the same 224 px input as the others here.
"""

from triplane3d.configs.eval import common


def get_config():
  c = common.get_base_config()
  c.suites = 'all'
  return c
