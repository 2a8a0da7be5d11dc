"""NYU-Depth v2 with the ridge per-patch depth probe (evaluate/depth_probe.py).

  python -m triplane3d.evaluate --config=configs/eval/nyu_depth.py --config.data_dir=$TFDS \
      --config.backbones=... --workdir=/tmp/eval_nyu

Needs nyu_depth_v2 (train, validation) in ArrayRecord format. This is NOT DINOv2's protocol
(256 bins, x4 upsampling, SigLoss + gradient loss, AdamW), whose paper numbers are linear RMSE
0.399 -> 0.398 (ViT-B/14): our numbers are not comparable with them. Not run here.
"""

from triplane3d.configs.eval import common


def get_config():
  c = common.get_base_config()
  c.suites = 'nyu_depth'
  return c
