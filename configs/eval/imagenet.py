"""ImageNet-1k linear probe (DINOv2 protocol), the head scored on ImageNet-R and ImageNet-Sketch.

  python -m triplane3d.evaluate --config=configs/eval/imagenet.py --config.data_dir=$TFDS \
      --config.backbones=dinov2=dinov2_vitb14.pth,3dprior=/runs/vitb --workdir=/tmp/eval_in1k

Needs imagenet2012 (train, validation), imagenet_r (test) and imagenet_sketch (test) in
ArrayRecord format in data_dir; missing ones are named, with how to get them, before any work.
Paper (ViT-B/14, DINOv2 -> 3D-Prior): ImageNet 84.5 -> 85.1, Im-R 63.3 -> 65.9, Im-Sketch
50.6 -> 52.4. Not run here (no ImageNet on this machine): expect hours per backbone on one GPU,
most of it feature extraction of 1.28M images.
"""

from triplane3d.configs.eval import common


def get_config():
  c = common.get_base_config()
  c.suites = 'imagenet'
  return c
