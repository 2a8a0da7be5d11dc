"""The paper's ablations on ViT-B/14, one argument each:

  python -m triplane3d.main --config=configs/ablations.py:no_triplane --workdir=DIR
  ... :no_distill | :scratch | :subset100k | :subset500k

- no_triplane: a plain upsampling conv decoder predicts RGB and depth directly (no renderer).
- no_distill: L_dist dropped (no teacher).
- scratch: random backbone, no distillation.
- subset100k / subset500k: a fixed random subset of ImageNet, with the same number of steps
  as the full 10-epoch run (25,020 at batch 512; if you change train.batch_size on the command
  line, also set train.num_steps = 10 * (1281167 // batch_size)).

Hardware and time as configs/vitb.py (no_triplane is ~2× faster: no rendering).
"""

from triplane3d.configs import common

IMAGENET_TRAIN = 1_281_167


def get_config(arg: str = 'no_triplane'):
  c = common.get_base_config()
  c.model.variant = 'vitb14'
  c.model.init_from = 'facebook/dinov2-base'
  # What train.num_epochs gives on the full set (the trainer drops partial batches).
  full_run_steps = c.train.num_epochs * (IMAGENET_TRAIN // c.train.batch_size)
  if arg == 'no_triplane':
    c.decoder.kind = 'conv'
    c.loss.norm_weight = 0.0
  elif arg == 'no_distill':
    c.loss.dist_weight = 0.0
  elif arg == 'scratch':
    c.model.init_from = ''
    c.loss.dist_weight = 0.0
  elif arg in ('subset100k', 'subset500k'):
    c.data.subset_size = 100_000 if arg == 'subset100k' else 500_000
    c.train.num_steps = full_run_steps
  else:
    raise ValueError(
      f'unknown ablation {arg!r}: no_triplane, no_distill, scratch, subset100k, subset500k.'
    )
  return c
