"""Worker for the multi-process trainer test: one process of a 2-host training job.

argv: data_dir workdir num_steps. Emits {'process', 'step', 'losses'}.
"""

import sys

from multiprocess import emit
from tiny import tiny_config

from triplane3d import train


def main():
  import jax

  data_dir, workdir, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
  # fsdp spans both processes: parameters and checkpoints are split across hosts.
  over = {'train.num_steps': num_steps, 'mesh.data': 1, 'mesh.fsdp': 8}
  result = train.run(tiny_config(data_dir, **over), workdir)
  losses = {str(k): v for k, v in result['losses'].items()}
  emit({'process': jax.process_index(), 'step': result['step'], 'losses': losses})
