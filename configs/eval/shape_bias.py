"""Cue-conflict shape bias (Geirhos et al.; model-vs-human's aggregation) of the ImageNet head.

  python -m triplane3d.evaluate --config=configs/eval/shape_bias.py --config.data_dir=$TFDS \
      --config.backbones=... --workdir=/tmp/eval_in1k

The decision needs the ImageNet linear head, so this runs the imagenet suite too (reusing its
features and probe when --workdir already holds them). The 1,280 stimuli come from
github.com/rgeirhos/texture-vs-shape (stimuli/style-transfer-preprocessed-512), imported with
python -m triplane3d.data.import_folder --name=cue_conflict. Writes a per-category plot.
"""

from triplane3d.configs.eval import common


def get_config():
  c = common.get_base_config()
  c.suites = 'imagenet,shape_bias'
  return c
