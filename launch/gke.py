r"""GKE: a JobSet manifest that runs the training command on every host of a TPU slice.

  python -m triplane3d.launch.gke ACTION --name=RUN --accelerator=v5litepod-16 \
      --bucket=gs://BUCKET --install='triplane3d[tpu] @ git+https://...' [--spot] \
      [--cluster=C --location=L] [--dry-run] [-- flags for triplane3d.main]

ACTION is one of
  nodepool  `gcloud container node-pools create` for the slice (machine type, topology, nodes).
  apply     writes the JobSet manifest (--manifest) and `kubectl apply`s it.
  resume    deletes the JobSet if present and applies it again: same workdir, so main.py
            continues from the last checkpoint in the bucket (preemptions within
            --max-restarts need no action: the JobSet restarts the slice itself).
  logs      follows worker 0's log.
  delete    the JobSet. The bucket is never touched.
  xpk       the equivalent `xpk workload create` (xpk generates a JobSet like this one).

Why a JobSet: Google's GKE documentation runs multi-host TPU training as a JobSet (its
Multislice and Kueue guides), and xpk, which it recommends for quick trials, generates one
underneath. The manifest needs only kubectl and the JobSet controller, can be read and
versioned, and says everything here: one Indexed Job per slice with completions = parallelism
= hosts, the TPU node selectors `cloud.google.com/gke-tpu-accelerator` and
`cloud.google.com/gke-tpu-topology`, `google.com/tpu` = chips per host, the same command in
every pod, and `failurePolicy.maxRestarts` for preemptions. GKE's TPU webhook gives each pod
TPU_WORKER_HOSTNAMES / TPU_WORKER_ID, from which main.py starts jax.distributed.
"""

from __future__ import annotations

import argparse
import dataclasses

import yaml

from triplane3d.launch import shell, topology

ACTIONS = ('nodepool', 'apply', 'resume', 'logs', 'delete', 'xpk')
JOBSET_RELEASE = 'https://github.com/kubernetes-sigs/jobset/releases/download/v0.8.1/manifests.yaml'


@dataclasses.dataclass(frozen=True)
class Job:
  name: str  # JobSet name, also the run name: workdir gs://BUCKET/NAME.
  tpu: topology.Slice
  bucket: str
  install: str  # A pip requirement the pods can reach, or 'none' (the image has the project).
  config: str = 'configs/vitb.py'
  image: str = 'python:3.11'
  spot: bool = False
  max_restarts: int = 20
  grace_s: int = 120  # Time between SIGTERM and SIGKILL: enough for main.py to checkpoint.
  service_account: str | None = None  # Kubernetes SA with Workload Identity access to the bucket.
  namespace: str = 'default'
  extra: tuple[str, ...] = ()

  @property
  def workdir(self) -> str:
    return f'{self.bucket}/{self.name}'


def pod_script(job: Job) -> str:
  """The command of every pod (the same in all of them)."""
  install = [] if job.install == 'none' else [shell.pip_install(job.install)]
  command = shell.main_command(job.config, job.workdir, job.extra)
  return '\n'.join([
    'set -e',
    *install,
    shell.CD_PACKAGE,
    'export PYTHONUNBUFFERED=1',
    # Only the pod whose node is preempted gets SIGTERM. main.py then saves and exits 0 on every
    # host, which would complete the Job; exiting 143 here fails it, so the JobSet restarts the
    # slice and main.py resumes from the bucket.
    'stopping=0',
    "trap 'stopping=1; kill -TERM \"$child\" 2>/dev/null' TERM",
    'set +e',
    *shell.wait_lines(command),
    '[ "$stopping" = 0 ] || exit 143',
    'exit "$rc"',
  ])  # fmt: skip


def jobset(job: Job) -> dict:
  """The JobSet manifest as a dict (see the module docstring for each part's reason)."""
  selector = {
    'cloud.google.com/gke-tpu-accelerator': job.tpu.gke_accelerator,
    'cloud.google.com/gke-tpu-topology': job.tpu.topology,
  }
  if job.spot:
    selector['cloud.google.com/gke-spot'] = 'true'
  pod = {
    'restartPolicy': 'Never',
    'terminationGracePeriodSeconds': job.grace_s,
    'nodeSelector': selector,
    'containers': [
      {
        'name': 'triplane3d',
        'image': job.image,
        'command': ['bash', '-c', pod_script(job)],
        'resources': {'limits': {'google.com/tpu': job.tpu.chips_per_host}},
      }
    ],
  }
  if job.service_account:
    pod['serviceAccountName'] = job.service_account
  hosts = job.tpu.hosts
  return {
    'apiVersion': 'jobset.x-k8s.io/v1alpha2',
    'kind': 'JobSet',
    'metadata': {
      'name': job.name,
      'namespace': job.namespace,
      # One slice per node pool: the Job's pods never straddle two slices.
      'annotations': {
        'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'
      },
    },
    'spec': {
      'failurePolicy': {'maxRestarts': job.max_restarts},
      'replicatedJobs': [
        {
          'name': 'slice',
          'replicas': 1,
          'template': {
            'spec': {
              'completionMode': 'Indexed',  # Pod i is TPU worker i.
              'parallelism': hosts,
              'completions': hosts,
              'backoffLimit': 0,  # Any pod failing restarts the whole slice (all hosts or none).
              'template': {'spec': pod},
            }
          },
        }
      ],
    },
  }


class _Dumper(yaml.SafeDumper):
  pass


# Multi-line strings (the pod script) as readable `|` blocks.
_Dumper.add_representer(
  str,
  lambda d, s: d.represent_scalar('tag:yaml.org,2002:str', s, style='|' if '\n' in s else None),
)


def manifest(job: Job) -> str:
  return yaml.dump(jobset(job), Dumper=_Dumper, sort_keys=False, width=100)


def _gcloud_location(args: argparse.Namespace) -> list[str]:
  if not args.cluster or not args.location:
    raise shell.LaunchError('pass --cluster=CLUSTER and --location=REGION_OR_ZONE of the cluster')
  return [f'--cluster={args.cluster}', f'--location={args.location}'] + (
    [f'--project={args.project}'] if args.project else []
  )


def run(action: str, job: Job, args: argparse.Namespace, runner: shell.Runner) -> None:
  runner.say(job.tpu.describe())
  kubectl = ['kubectl', f'--namespace={job.namespace}']
  if action == 'nodepool':
    topo = [f'--tpu-topology={job.tpu.topology}'] if job.tpu.hosts > 1 else []
    # TPUs are zonal: in a regional cluster the pool must name the zone that has them.
    topo += [f'--node-locations={args.zone}'] if args.zone else []
    runner.run(
      ['gcloud', 'container', 'node-pools', 'create', f'{job.name}-pool', *_gcloud_location(args),
       f'--machine-type={job.tpu.machine_type}', *topo, f'--num-nodes={job.tpu.hosts}',
       *(['--spot'] if job.spot else [])]
    )  # fmt: skip
    runner.say('once per cluster, the JobSet controller:')
    runner.run(['kubectl', 'apply', '--server-side', '-f', JOBSET_RELEASE])
  elif action in ('apply', 'resume'):
    runner.say(f'{job.tpu.hosts} pod(s), workdir {job.workdir}')
    if action == 'resume':
      runner.run([*kubectl, 'delete', 'jobset', job.name, '--ignore-not-found'])
    path = args.manifest or f'triplane3d-{job.name}.jobset.yaml'
    runner.write(path, manifest(job))
    runner.run([*kubectl, 'apply', '-f', path])
  elif action == 'logs':
    worker0 = (
      f'jobset.sigs.k8s.io/jobset-name={job.name},batch.kubernetes.io/job-completion-index=0'
    )
    runner.run([*kubectl, 'logs', '-f', '-l', worker0])
  elif action == 'delete':
    runner.say('the bucket and its checkpoints stay')
    runner.run([*kubectl, 'delete', 'jobset', job.name])
  elif action == 'xpk':
    runner.run(
      ['xpk', 'workload', 'create', f'--cluster={args.cluster or "CLUSTER"}',
       f'--workload={job.name}', f'--tpu-type={job.tpu.accelerator}', '--num-slices=1',
       f'--docker-image={job.image}', f'--max-restarts={job.max_restarts}',
       f'--command={pod_script(job)}']
    )  # fmt: skip


def parse(argv: list[str]) -> tuple[str, Job, argparse.Namespace]:
  own, extra = shell.split_passthrough(argv)
  p = argparse.ArgumentParser(prog='python -m triplane3d.launch.gke', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
  p.add_argument('action', choices=ACTIONS)
  p.add_argument('--name', required=True, help='JobSet and run name (workdir gs://BUCKET/NAME)')
  p.add_argument('--accelerator', required=True, help='e.g. v5litepod-16, v4-32, v6e-16')
  p.add_argument('--bucket', help='gs://NAME for the workdir')
  p.add_argument('--install', help="pip requirement for the pods, or 'none'")
  p.add_argument('--config', default='configs/vitb.py')
  p.add_argument('--image', default='python:3.11')
  p.add_argument('--spot', action='store_true', help='schedule on spot node pools')
  p.add_argument('--max-restarts', type=int, default=20)
  p.add_argument('--service-account', help='Kubernetes service account (Workload Identity)')
  p.add_argument('--namespace', default='default')
  p.add_argument('--manifest', help='where apply writes the manifest')
  p.add_argument('--cluster')
  p.add_argument('--location', help="the cluster's region or zone")
  p.add_argument('--zone', help='nodepool: the zone of the TPUs, e.g. us-west4-a')
  p.add_argument('--project')
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  a = p.parse_args(own)
  shell.check_name(a.name)
  runs = a.action in ('apply', 'resume', 'xpk')
  if runs and not a.install:
    raise shell.LaunchError(
      '--install is required: pods start from --image and pip install the project. Pass '
      "--install='triplane3d[tpu] @ git+https://github.com/YOU/triplane3d.git@COMMIT' (any "
      'requirement the pods can reach), or --install=none with an --image that has it'
    )
  job = Job(
    name=a.name,
    tpu=topology.parse(a.accelerator),
    bucket=shell.check_bucket(a.bucket) if runs else (a.bucket or ''),
    install=a.install or 'none',
    config=shell.check_config(a.config),
    image=a.image,
    spot=a.spot,
    max_restarts=a.max_restarts,
    service_account=a.service_account,
    namespace=a.namespace,
    extra=tuple(extra),
  )
  return a.action, job, a


def main(argv: list[str], out=None) -> shell.Runner:
  action, job, args = parse(argv)
  runner = shell.Runner(args.dry_run, out)
  run(action, job, args, runner)
  return runner


if __name__ == '__main__':
  shell.cli(main)
