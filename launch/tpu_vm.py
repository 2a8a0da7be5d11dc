r"""Cloud TPU VMs (one host or a pod slice): create, install, run on every worker, resume.

  python -m triplane3d.launch.tpu_vm ACTION --name=NAME --zone=ZONE --accelerator=TYPE \
      [--spot | --queued] [--bucket=gs://BUCKET] [--config=configs/vitb.py] [--dry-run] \
      [-- flags for triplane3d.main]

ACTION is one of
  create   the slice: `queued-resources create` with --spot or --queued (then waits until it
           is ACTIVE), else `tpu-vm create` (on demand, fails at once without capacity).
  setup    installs the project on every worker: a wheel of this checkout copied with
           `tpu-vm scp --worker=all` (default), or --install=PIP_REQUIREMENT.
  run      starts `python3 -m triplane3d.main` on all workers (`tpu-vm ssh --worker=all`): the
           same command everywhere, workdir gs://BUCKET/RUN, log in ~/triplane3d-RUN.log.
  logs     follows that log on --worker (0 by default).
  resume   after a preemption: if the slice is not healthy, deletes and recreates it and
           installs again; then starts the same command on the same workdir, so main.py
           continues from the last checkpoint in the bucket. Nothing else is redone.
  watch    polls every --poll seconds and resumes after each preemption until the run's log
           says it finished.
  delete   the slice (and its queued resource). The bucket is never touched.

`--dry-run` prints the exact commands (a pasteable shell script) and runs nothing. docs/pods.md
has the whole procedure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time

from triplane3d.launch import shell, topology

ACTIONS = ('create', 'setup', 'run', 'logs', 'resume', 'watch', 'delete')
_HEALTHY = ('ACTIVE', 'READY')  # Queued-resource state / TPU VM state of a usable slice.
_RUNNING = 'pgrep -f "^python3 -m triplane3d[.]main"'  # [.]: never matches this shell itself.
# main.py's last log line; the run is done only when it stopped without being preempted.
_FINISHED = re.compile(r'finished at step \d+ \(preempted: False\)')

# main.py calls jax.distributed.initialize() only where an environment variable says "several
# processes" (TPU_WORKER_HOSTNAMES, JAX_COORDINATOR_ADDRESS, ...), and a TPU VM sets none of them
# (JAX reads the workers from the metadata server instead). So each worker exports worker 0's
# address, read from the same metadata entry JAX reads (entries are `host` or `name:id:ip`, worker
# 0 first); the number of processes and this process's index JAX still detects itself. 8476 is
# JAX's coordinator port for Cloud TPU.
_COORDINATOR = (
  'worker0="$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata'
  '/v1/instance/attributes/worker-network-endpoints | cut -d, -f1)"\n'
  'export JAX_COORDINATOR_ADDRESS="${worker0##*:}:8476"'
)


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything the actions need, from the flags."""

  name: str
  zone: str
  tpu: topology.Slice
  capacity: str  # 'spot' or 'queued' (queued resources) or 'on-demand' (tpu-vm create).
  config: str
  install: str  # 'wheel' (this checkout) or a pip requirement.
  bucket: str | None = None  # gs://NAME; required by run / resume / watch.
  run_name: str = ''
  project: str | None = None
  extra: tuple[str, ...] = ()
  timeout_s: float = 6 * 3600  # How long to wait for a queued resource.
  poll_s: float = 30

  @property
  def workdir(self) -> str:
    return f'{shell.check_bucket(self.bucket)}/{self.run_name or self.name}'

  @property
  def log_file(self) -> str:
    return f'$HOME/triplane3d-{self.run_name or self.name}.log'

  @property
  def queued(self) -> bool:
    return self.capacity != 'on-demand'

  def gcloud(self, *args: str) -> list[str]:
    project = [f'--project={self.project}'] if self.project else []
    return ['gcloud', 'compute', 'tpus', *args, f'--zone={self.zone}', *project]

  def ssh(self, worker: str, command: str) -> list[str]:
    return self.gcloud('tpu-vm', 'ssh', self.name, f'--worker={worker}', f'--command={command}')

  def state_command(self) -> list[str]:
    if self.queued:
      return self.gcloud('queued-resources', 'describe', self.name, '--format=value(state.state)')
    return self.gcloud('tpu-vm', 'describe', self.name, '--format=value(state)')


def create(job: Job, runner: shell.Runner) -> None:
  runner.say(job.tpu.describe())
  tpu = [f'--accelerator-type={job.tpu.accelerator}']
  if not job.queued:
    runner.run(
      job.gcloud('tpu-vm', 'create', job.name, *tpu, f'--version={job.tpu.runtime_version}')
    )
    return
  spot = ['--spot'] if job.capacity == 'spot' else []
  runner.run(
    job.gcloud(
      'queued-resources', 'create', job.name, f'--node-id={job.name}', *tpu,
      f'--runtime-version={job.tpu.runtime_version}', *spot,
    )
  )  # fmt: skip
  runner.wait_for(job.state_command(), 'ACTIVE', job.timeout_s, job.poll_s)


def _source_root() -> str:
  root = os.path.dirname(os.path.dirname(os.path.abspath(shell.__file__)))
  if not os.path.isfile(os.path.join(root, 'pyproject.toml')):
    raise shell.LaunchError(
      'the default --install=wheel builds this checkout, but triplane3d is not installed from '
      "one: run from a checkout (pip install -e .), or pass --install='triplane3d[tpu] @ "
      "git+https://...' (any pip requirement every worker can reach)"
    )
  return root


def setup(job: Job, runner: shell.Runner) -> None:
  spec = job.install
  if spec == 'wheel':
    root = _source_root()
    with open(os.path.join(root, 'pyproject.toml')) as f:
      version = re.search(r'^version = "(.+)"', f.read(), re.M)[1]
    wheel = f'triplane3d-{version}-py3-none-any.whl'
    dist = os.path.join(tempfile.gettempdir(), 'triplane3d_dist')
    runner.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', f'--wheel-dir={dist}', root])
    runner.run(job.gcloud('tpu-vm', 'scp', os.path.join(dist, wheel), f'{job.name}:/tmp/', '--worker=all'))  # fmt: skip
    # The extra pulls JAX with libtpu; the forced reinstall replaces an installed copy of the
    # same version (pip would keep it) with this checkout's code.
    install = f'{shell.pip_install(f"/tmp/{wheel}[tpu]")}\n'
    install += f'python3 -m pip install --force-reinstall --no-deps /tmp/{wheel}'
    runner.run(job.ssh('all', install))
    return
  runner.run(job.ssh('all', shell.pip_install(spec)))


def remote_script(job: Job) -> str:
  """The script every worker runs: identical on all of them (nothing in it names a worker)."""
  command = shell.main_command(job.config, job.workdir, job.extra)
  lines = [
    'set -e',
    shell.CD_PACKAGE,
    # Two trainers on one workdir would corrupt it: refuse instead.
    f'if {_RUNNING} >/dev/null; then echo "triplane3d.main is already running" >&2; exit 1; fi',
    'export PYTHONUNBUFFERED=1',
    *([_COORDINATOR] if job.tpu.hosts > 1 else []),
    # Detached, so the run outlives this ssh session (and a closed laptop).
    f'setsid nohup {command} > {job.log_file} 2>&1 < /dev/null &',
  ]
  return '\n'.join(lines)


def start(job: Job, runner: shell.Runner) -> None:
  runner.say(f'{job.tpu.hosts} worker(s), workdir {job.workdir}, log {job.log_file}')
  runner.run(job.ssh('all', remote_script(job)))


def logs(job: Job, runner: shell.Runner, worker: str = '0') -> None:
  runner.run(job.ssh(worker, f'tail -n 200 -F {job.log_file}'))


def delete(job: Job, runner: shell.Runner) -> None:
  runner.say(f'deleting {job.name}; the bucket and its checkpoints stay')
  if job.queued:  # --force deletes the node together with its queued resource.
    runner.run(job.gcloud('queued-resources', 'delete', job.name, '--force', '--quiet'))
  else:
    runner.run(job.gcloud('tpu-vm', 'delete', job.name, '--quiet'))


def resume(job: Job, runner: shell.Runner) -> None:
  shell.check_bucket(job.bucket)  # Fail on a missing bucket before deleting anything.
  state = runner.query(job.state_command())
  if runner.dry_run:
    runner.say('if that state is not ACTIVE/READY (preempted, suspended, failed), recreate:')
  if state not in _HEALTHY:
    if state is not None or runner.dry_run:  # None: no such slice (already gone).
      delete(job, runner)
    create(job, runner)
    setup(job, runner)
  start(job, runner)  # Same workdir: main.py restores the last checkpoint there.


def watch(job: Job, runner: shell.Runner) -> None:
  """Resumes after every preemption until main.py logs that the run finished."""
  # Exits 0 unless ssh itself fails (then the next poll tries again).
  probe = job.ssh(
    '0', f'{_RUNNING} >/dev/null && echo running || tail -n 5 {job.log_file} 2>&1 || true'
  )
  if runner.dry_run:
    runner.say(f'every {job.poll_s:g} s: the slice state and, on worker 0, whether it runs:')
    runner.query(probe)
    runner.say('after a preemption:')
    resume(job, runner)
    return
  while True:
    if runner.query(job.state_command()) not in _HEALTHY:
      resume(job, runner)
    else:
      status = runner.query(probe)
      if status and _FINISHED.search(status):
        runner.say(f'finished: {job.workdir}')
        return
      if status is not None and status != 'running':
        if 'preempted: True' not in status:
          raise shell.LaunchError(f'the run stopped without finishing:\n{status}\n(see: logs)')
        start(job, runner)  # Stopped by SIGTERM on a slice that stayed up (maintenance).
    time.sleep(job.poll_s)


def parse(argv: list[str]) -> tuple[str, Job, argparse.Namespace]:
  own, extra = shell.split_passthrough(argv)
  p = argparse.ArgumentParser(prog='python -m triplane3d.launch.tpu_vm', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
  p.add_argument('action', choices=ACTIONS)
  p.add_argument('--name', required=True, help='TPU (and queued resource) name')
  p.add_argument('--zone', required=True, help='e.g. us-west4-a (v5e), us-east5-b (v6e)')
  p.add_argument('--accelerator', required=True, help='e.g. v5litepod-16, v4-32, v6e-8')
  p.add_argument('--project', help='default: gcloud config get project')
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument('--spot', action='store_true', help='queued resource on spot VMs')
  capacity.add_argument('--queued', action='store_true', help='queued resource, on demand')
  p.add_argument('--bucket', help='gs://NAME; the workdir is gs://NAME/RUN')
  p.add_argument('--run', default='', help='run name (workdir in the bucket); default: --name')
  p.add_argument('--config', default='configs/vitb.py')
  p.add_argument('--install', default='wheel', help="'wheel' (this checkout) or a requirement")
  p.add_argument('--worker', default='0', help='logs: a worker index, or all')
  p.add_argument('--timeout', type=float, default=6 * 3600, help='s to wait for capacity')
  p.add_argument('--poll', type=float, default=30, help='s between state checks')
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  a = p.parse_args(own)
  if a.action in ('run', 'resume', 'watch'):
    shell.check_bucket(a.bucket)
  job = Job(
    name=shell.check_name(a.name),
    zone=a.zone,
    tpu=topology.parse(a.accelerator),
    capacity='spot' if a.spot else 'queued' if a.queued else 'on-demand',
    config=shell.check_config(a.config),
    install=a.install,
    bucket=a.bucket,
    run_name=a.run,
    project=a.project,
    extra=tuple(extra),
    timeout_s=a.timeout,
    poll_s=a.poll,
  )
  return a.action, job, a


def main(argv: list[str], out=None) -> shell.Runner:
  action, job, args = parse(argv)
  runner = shell.Runner(args.dry_run, out)
  if action == 'logs':
    logs(job, runner, args.worker)
  else:
    {'create': create, 'setup': setup, 'run': start, 'resume': resume, 'watch': watch,
     'delete': delete}[action](job, runner)  # fmt: skip
  return runner


if __name__ == '__main__':
  shell.cli(main)
