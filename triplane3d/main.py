"""Entry point: `python -m triplane3d.main --config=configs/vitb.py --workdir=DIR`.

Without `--config` the embedded demo config (configs/demo.py: synthetic scenes, tiny model)
runs. Any config field can be overridden with `--config.section.field=value`; an unknown field
is an error naming the closest valid ones.

The resolved config is stored in the workdir (config.json, config.txt). Running again on the
same workdir resumes; a config that changes the run (learning rate, model, data, ...) is then
refused with each differing field listed, unless `--allow_config_change` (see
`run_config.RESUMABLE` for what may change freely, e.g. a larger train.num_steps).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from triplane3d import console, run_config

_DEMO = run_config.config_file('demo.py')
if __name__ == '__main__' and (_error := run_config.unknown_override(sys.argv, _DEMO)):
  # Before the flag below is defined: ml_collections would raise `AttributeError: "'foo'"`.
  sys.exit(f'error: {_error}')
_CONFIG = config_flags.DEFINE_config_file(
  'config', _DEMO, 'Experiment config file (see configs/).', lock_config=True
)
_ALLOW_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume a workdir even though the config changes the run (the differing fields are '
  'logged and the replaced config is kept beside the new one).',
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and images go.')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for multi-process runs without a '
  'cluster environment (TPU pods, SLURM and others are detected automatically).',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
_CPU_COLLECTIVES = flags.DEFINE_enum(
  'cpu_collectives', None, ['gloo', 'mpi'], 'Cross-process collectives on CPU devices.'
)

# Environment variables that mean "one of several processes": jax.distributed.initialize()
# then finds the coordinator by itself.
_CLUSTER_ENV = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_STEP_NUM_TASKS',
                'OMPI_COMM_WORLD_SIZE', 'JAX_COORDINATOR_ADDRESS')  # fmt: skip


def _init_distributed():
  import jax

  if _CPU_COLLECTIVES.value:
    jax.config.update('jax_cpu_collectives_implementation', _CPU_COLLECTIVES.value)
  if _COORDINATOR.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif any(os.environ.get(k) for k in _CLUSTER_ENV) and os.environ.get(
    'TPU_WORKER_HOSTNAMES', 'x'
  ) not in ('', 'localhost'):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise app.UsageError('pass --workdir=DIR (or set config.workdir).')
  # One line, not the whole config (~110 lines): train.run stores it in the workdir.
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  logging.info(
    'config %s%s; workdir %s (full config: %s)',
    config_flags.get_config_filename(flags.FLAGS['config']),
    f' with {overrides}' if overrides else '',
    workdir,
    os.path.join(workdir, 'config.txt'),
  )
  _init_distributed()
  from triplane3d import train

  summary = train.run(config, workdir, allow_config_change=_ALLOW_CHANGE.value)
  logging.info('finished at step %d (preempted: %s)', summary['step'], summary['preempted'])


if __name__ == '__main__':
  app.run(main)
