r"""SLURM GPU clusters: an sbatch script that trains on every GPU, requeues and resumes.

  python -m triplane3d.launch.slurm --name=RUN --nodes=2 --gpus-per-node=8 \
      --workdir=/shared/runs/RUN [--tasks=gpu|node] [--partition=P] [--time=24:00:00] \
      [--setup='source ~/venv/bin/activate'] [--dry-run] [-- flags for triplane3d.main]

Writes `--script` (default triplane3d-RUN.sbatch) and submits it with sbatch; `--dry-run`
prints both instead. main.py calls jax.distributed.initialize() under srun (SLURM_STEP_NUM_TASKS
is set), and JAX reads the coordinator (first node), the process count and index from SLURM.

Task layout: `--tasks=gpu` (default) starts one process per GPU, the layout JAX's SLURM
detection assumes (process i on a node uses GPU SLURM_LOCALID); `--tasks=node` starts one
process per node driving all its GPUs (JAX_LOCAL_DEVICE_IDS lists them all).

Preemption and time limits: `--requeue` puts a preempted job (or one whose node failed) back
in the queue; Slurm's SIGTERM reaches every task, and main.py checkpoints and exits. Five
minutes before --time the script gets SIGUSR1 (`--signal=B:USR1@300`), sends SIGTERM to the
tasks, waits for their checkpoint and requeues itself. A requeued job runs the same script on
the same workdir, so main.py resumes; `sbatch` of the same script does the same by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex

from triplane3d.launch import shell


@dataclasses.dataclass(frozen=True)
class Job:
  name: str
  workdir: str  # Shared by all nodes: an absolute path on a shared filesystem, or gs://.
  nodes: int
  gpus_per_node: int
  tasks: str = 'gpu'  # 'gpu': one process per GPU; 'node': one process per node.
  config: str = 'configs/vitb.py'
  time: str = '24:00:00'
  partition: str | None = None
  account: str | None = None
  cpus_per_task: int | None = None
  setup: str = ''  # Shell lines that make `python3` the one with triplane3d (venv, modules).
  signal_s: int = 300  # Warning before the time limit: time to write a checkpoint.
  extra: tuple[str, ...] = ()

  @property
  def tasks_per_node(self) -> int:
    return self.gpus_per_node if self.tasks == 'gpu' else 1


def script(job: Job) -> str:
  """The sbatch script: directives, environment, then srun under signal handling."""
  directives = [
    f'--job-name={job.name}',
    f'--nodes={job.nodes}',
    f'--ntasks-per-node={job.tasks_per_node}',
    # Per node, not per task: every task sees all the node's GPUs, so JAX can pick GPU
    # SLURM_LOCALID (--tasks=gpu) or use all of them (--tasks=node).
    f'--gpus-per-node={job.gpus_per_node}',
    f'--time={job.time}',
    f'--output={job.name}-%j.out',
    '--open-mode=append',  # A requeued run appends to the same log.
    '--requeue',
    f'--signal=B:USR1@{job.signal_s}',
    *([f'--cpus-per-task={job.cpus_per_task}'] if job.cpus_per_task else []),
    *([f'--partition={job.partition}'] if job.partition else []),
    *([f'--account={job.account}'] if job.account else []),
  ]
  devices = ','.join(str(i) for i in range(job.gpus_per_node))
  srun = f'srun --kill-on-bad-exit=1 {shell.main_command(job.config, job.workdir, job.extra)}'
  lines = [
    '#!/bin/bash',
    *(f'#SBATCH {d}' for d in directives),
    f'# Resume by hand: sbatch this file again (same workdir {job.workdir}).',
    'set -e',
    *([job.setup] if job.setup else []),
    shell.CD_PACKAGE,
    'export PYTHONUNBUFFERED=1',
    *([f'export JAX_LOCAL_DEVICE_IDS={devices}'] if job.tasks == 'node' else []),
    'requeue=0',
    # Near the time limit: SIGTERM to the tasks only (not this shell), which checkpoint and
    # exit; then requeue.
    'trap \'requeue=1; scancel --signal=TERM "$SLURM_JOB_ID"\' USR1',
    # Preemption: Slurm signals every process and requeues by itself; this shell must live on
    # until the tasks have saved.
    'trap \'echo "SIGTERM: the tasks are checkpointing"\' TERM',
    'set +e',
    *shell.wait_lines(srun),
    'if [ "$requeue" = 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
    'exit "$rc"',
  ]
  return '\n'.join(lines) + '\n'


def parse(argv: list[str]) -> tuple[Job, argparse.Namespace]:
  own, extra = shell.split_passthrough(argv)
  p = argparse.ArgumentParser(prog='python -m triplane3d.launch.slurm', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
  p.add_argument('--name', required=True, help='job name')
  p.add_argument('--workdir', help='absolute path on a shared filesystem, or gs://BUCKET/RUN')
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus-per-node', type=int, default=8)
  p.add_argument('--tasks', choices=('gpu', 'node'), default='gpu')
  p.add_argument('--config', default='configs/vitb.py')
  p.add_argument('--time', default='24:00:00')
  p.add_argument('--partition')
  p.add_argument('--account')
  p.add_argument('--cpus-per-task', type=int)
  p.add_argument('--setup', default='', help='shell lines run first, e.g. activate a venv')
  p.add_argument('--script', help='where to write the sbatch script')
  p.add_argument('--dry-run', action='store_true', help='print the script, submit nothing')
  a = p.parse_args(own)
  workdir = a.workdir or ''
  if not (os.path.isabs(workdir) or workdir.startswith('gs://')):
    raise shell.LaunchError(
      f'--workdir={a.workdir!r}: every node must see the same workdir; pass an absolute path '
      'on the shared filesystem (e.g. --workdir=/shared/runs/vitb) or gs://BUCKET/RUN'
    )
  if a.nodes < 1 or a.gpus_per_node < 1:
    raise shell.LaunchError('--nodes and --gpus-per-node must be at least 1')
  job = Job(
    name=shell.check_name(a.name),
    workdir=workdir.rstrip('/'),
    nodes=a.nodes,
    gpus_per_node=a.gpus_per_node,
    tasks=a.tasks,
    config=shell.check_config(a.config, allow_paths=True),
    time=a.time,
    partition=a.partition,
    account=a.account,
    cpus_per_task=a.cpus_per_task,
    setup=a.setup,
    extra=tuple(extra),
  )
  return job, a


def main(argv: list[str], out=None) -> shell.Runner:
  job, args = parse(argv)
  runner = shell.Runner(args.dry_run, out)
  path = args.script or f'triplane3d-{job.name}.sbatch'
  processes = job.nodes * job.tasks_per_node
  runner.say(f'{job.nodes} node(s) x {job.gpus_per_node} GPU(s), {processes} process(es)')
  runner.write(path, script(job))
  runner.run(['sbatch', path])
  runner.say(f'logs: tail -F {shlex.quote(job.name)}-JOBID.out; resume: sbatch {path}')
  return runner


if __name__ == '__main__':
  shell.cli(main)
