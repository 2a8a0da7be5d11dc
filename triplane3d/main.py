"""Entry point: `python -m triplane3d.main --config=configs/vitb.py --workdir=DIR`.

Without `--config` the embedded demo config (configs/demo.py: synthetic scenes, tiny model)
runs. Any config field can be overridden with `--config.section.field=value`; an unknown field
is an error.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

import triplane3d.configs

_DEMO = os.path.join(os.path.dirname(triplane3d.configs.__file__), 'demo.py')
_CONFIG = config_flags.DEFINE_config_file(
  'config', _DEMO, 'Experiment config file (see configs/).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and images go.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise app.UsageError('pass --workdir=DIR (or set config.workdir).')
  logging.info('config:\n%s', config)
  from triplane3d import train  # Imported late: flags must be parsed before jax starts.

  train.run(config, workdir)


if __name__ == '__main__':
  app.run(main)
