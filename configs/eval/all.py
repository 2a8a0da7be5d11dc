"""Every suite: synthetic, imagenet (+ ImageNet-R, -Sketch, PUG:ImageNet, ImageNet-3DCC),
shape_bias, inat21, nyu_depth.

  python -m triplane3d.evaluate --config=configs/eval/all.py --config.data_dir=$TFDS \
      --config.backbones=... --workdir=/tmp/eval_all

Every real dataset is looked up before any work; see the suite files for each one's needs.
The synthetic suite runs at the same 224 px input as the others here.
"""

from triplane3d.configs.eval import common
from triplane3d.evaluate import robustness


def get_config():
  c = common.get_base_config()
  c.suites = 'all'
  c.pug_imagenet.splits = ('texture', 'size')
  c.imagenet_3dcc.corruptions = robustness.CORRUPTIONS_3DCC
  return c
