"""ImageNet-1k linear probe (DINOv2 protocol), the head scored on ImageNet-R, ImageNet-Sketch,
PUG:ImageNet (texture and size factors) and ImageNet-3DCC (12 corruptions x 5 severities).

  python -m triplane3d.evaluate --config=configs/eval/imagenet.py --config.data_dir=$TFDS \
      --config.backbones=dinov2=dinov2_vitb14.pth,3dprior=/runs/vitb --workdir=/tmp/eval_in1k

Needs imagenet2012 (train, validation), imagenet_r (test), imagenet_sketch (test), pug_imagenet
(texture, size) and imagenet_3dcc (60 splits <corruption>_<severity>) in ArrayRecord format in
data_dir (docs/evaluation.md: how to get and import each); missing ones are named, with how to
get them, before any work. Drop a set with e.g. --config.imagenet_3dcc.corruptions=() or
--config.pug_imagenet.splits=(). Paper (ViT-B/14, DINOv2 -> 3D-Prior): ImageNet 84.5 -> 85.1,
Im-R 63.3 -> 65.9, Im-Sketch 50.6 -> 52.4, PUG-Texture 25.3 -> 26.2, PUG-Size 32.2 -> 33.4. The
default probe is the fast mode (centre crops); --config.probe.augment=True trains it as DINOv2
does (10 extraction passes of the training set). Not run here (no ImageNet on this machine): expect hours per backbone on one GPU,
most of it feature extraction of 1.28M images.
"""

from triplane3d.configs.eval import common
from triplane3d.evaluate import robustness


def get_config():
  c = common.get_base_config()
  c.suites = 'imagenet'
  c.pug_imagenet.splits = ('texture', 'size')
  c.imagenet_3dcc.corruptions = robustness.CORRUPTIONS_3DCC
  return c
