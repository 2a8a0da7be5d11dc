"""Synthetic suite: shape top-1, novel textures, other sizes, cue-conflict shape bias, depth.

  python -m triplane3d.evaluate --config=configs/eval/synthetic.py \
      --config.backbones=random:vit_tiny14,/tmp/triplane3d_demo --workdir=/tmp/eval_synthetic
  python -m triplane3d.evaluate --config=configs/eval/synthetic.py:tiny ...   # CI size

Runs anywhere (every image is generated). At 112 px (the demo's input size) on 2 CPU cores:
90 s for two vit_tiny14 backbones from scratch, most of it rendering and probe fitting; the
demo run should beat random weights by about 7 points of top-1 on every set
(docs/evaluation.md). `tiny`: 28 px, 40-100 images per set, about 15 s.
"""

from triplane3d.configs.eval import common


def get_config(arg: str | None = None):
  c = common.get_base_config()
  c.suites = 'synthetic'
  c.img_size = 112
  if arg == 'tiny':  # Seconds on a CPU: the CI test's size.
    c.img_size = 28
    c.batch_size = 32
    c.synthetic.num_train = 100
    c.synthetic.num_val = 40
    c.synthetic.num_test = 40
    c.synthetic.num_shift = 40
    c.synthetic.num_depth_train = 40
    c.synthetic.depth_sub = 2
    c.synthetic.probe_epochs = 30
    c.synthetic.probe_batch_size = 32
  elif arg:
    raise ValueError(f"unknown argument {arg!r} for configs/eval/synthetic.py: use 'tiny' or none.")
  return c
