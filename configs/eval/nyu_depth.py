"""NYU-Depth v2 with DINOv2's linear depth protocol (evaluate/depth_linear.py, nyu_suite.py).

  python -m triplane3d.evaluate --config=configs/eval/nyu_depth.py --config.data_dir=$TFDS \
      --config.backbones=... --workdir=/tmp/eval_nyu
  # DINOv2's own data layout instead of TFDS:  --config.nyu_depth.folder=/data/nyu
  # Minutes on a CPU (closed-form ridge, not the protocol):  --config.nyu_depth.probe=ridge

Needs nyu_depth_v2 (train, validation) in ArrayRecord format, or the toolbox folder. Head: 256
bins on [0.001, 10] m over the patch + class tokens of blocks [2, 5, 8, 11] (S/B) or [4, 11, 17,
23] (L), SigLoss + 0.5 gradient loss, AdamW 1e-4, 38,400 steps at batch 16. Features are taken
once from centre crops at img_size (DINOv2 trains on 416×544 random crops with flips, rotations
and colour jitter, and tests on full 480×640 frames), so expect numbers near, not equal to, the
paper's linear RMSE 0.399 -> 0.398 (ViT-B/14). Not run here: on one GPU expect minutes per
backbone for 1000 + 654 images (extraction) plus the 38,400 head steps.
"""

from triplane3d.configs.eval import common


def get_config():
  c = common.get_base_config()
  c.suites = 'nyu_depth'
  return c
