"""Tests for launch/{topology,shell,tpu_vm,gke,slurm}.py without gcloud, kubectl or sbatch.

Dry runs are checked for what a real run depends on (worker counts, one command for every
worker, the workdir in the bucket, the resume path); real runs go through a recording
`subprocess.run`; and the generated bash (the GKE pod script, the sbatch script) is run under
bash with fake `python3` / `srun` / `scancel` / `scontrol`, and signalled like a preemption.
"""

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from triplane3d.launch import gke, shell, slurm, topology, tpu_vm

BUCKET = 'gs://my-bucket'


@pytest.mark.parametrize(
  'name, canonical, chips, hosts, per_host, topo',
  [
    ('v4-8', 'v4-8', 4, 1, 4, '2x2x1'),
    ('v4-32', 'v4-32', 16, 4, 4, '2x2x4'),
    ('v5p-128', 'v5p-128', 64, 16, 4, '4x4x4'),
    ('v5litepod-4', 'v5litepod-4', 4, 1, 4, '2x2'),
    ('v5litepod-8', 'v5litepod-8', 8, 1, 8, '2x4'),
    ('v5litepod-16', 'v5litepod-16', 16, 4, 4, '4x4'),
    ('v5e-256', 'v5litepod-256', 256, 64, 4, '16x16'),
    ('v6e-8', 'v6e-8', 8, 1, 8, '2x4'),
    ('v6e-64', 'v6e-64', 64, 16, 4, '8x8'),
  ],
)
def test_slice_shapes(name, canonical, chips, hosts, per_host, topo):
  s = topology.parse(name)
  assert (s.accelerator, s.chips, s.hosts, s.chips_per_host, s.topology) == (
    canonical, chips, hosts, per_host, topo
  )  # fmt: skip
  assert s.hosts * s.chips_per_host == s.chips


def test_runtime_versions_and_gke_labels():
  assert topology.parse('v4-16').runtime_version == 'tpu-ubuntu2204-base'
  assert topology.parse('v5p-8').runtime_version == 'v2-alpha-tpuv5'
  assert topology.parse('v6e-16').runtime_version == 'v2-alpha-tpuv6e'
  v5e = topology.parse('v5litepod-16')
  assert (v5e.runtime_version, v5e.gke_accelerator, v5e.machine_type) == (
    'v2-alpha-tpuv5-lite', 'tpu-v5-lite-podslice', 'ct5lp-hightpu-4t'
  )  # fmt: skip
  assert topology.parse('v6e-8').machine_type == 'ct6e-standard-8t'


@pytest.mark.parametrize(
  'name, says',
  [('v3-8', 'v5litepod-N'), ('tpu', 'v4-N'), ('v5litepod-12', 'v5litepod-16'), ('v4-7', 'v4-8')],
)
def test_unknown_accelerator_names_the_valid_ones(name, says):
  with pytest.raises(shell.LaunchError, match=says):
    topology.parse(name)


def _tpu_vm(action, *flags, accelerator='v5litepod-16'):
  out = io.StringIO()
  runner = tpu_vm.main(
    [action, '--name=p3d', '--zone=us-west4-a', f'--accelerator={accelerator}', *flags], out
  )
  return runner, out.getvalue()


def _ssh_scripts(runner):
  """The --command of every `tpu-vm ssh`, with its --worker."""
  found = []
  for cmd in runner.commands:
    if cmd[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']:
      worker = next(a for a in cmd if a.startswith('--worker='))
      found.append((worker, next(a for a in cmd if a.startswith('--command='))))
  return found


@pytest.mark.parametrize('accelerator, hosts', [('v4-8', 1), ('v4-32', 4), ('v5litepod-64', 16)])
def test_tpu_vm_run_starts_one_command_on_all_workers(accelerator, hosts):
  runner, text = _tpu_vm('run', f'--bucket={BUCKET}/', '--dry-run', '--', '--config.x=1',
                         accelerator=accelerator)  # fmt: skip
  [(worker, command)] = _ssh_scripts(runner)
  assert worker == '--worker=all' and f'{hosts} worker(s)' in text
  assert f'--workdir={BUCKET}/p3d --config.x=1 >' in command  # The bucket, extra flags passed.
  assert 'cd "$pkg"' in command and '--config=configs/vitb.py' in command
  # Multi-host: every worker exports worker 0 as the coordinator (read on the worker, so the
  # command is still the same everywhere); one host needs none.
  assert ('JAX_COORDINATOR_ADDRESS' in command) == (hosts > 1)
  assert 'WORKER_ID' not in command and 'worker=0' not in command


def test_tpu_vm_create_queued_spot_or_on_demand():
  runner, _ = _tpu_vm('create', '--spot', '--dry-run')
  create, wait = runner.commands
  assert create[3:6] == ['queued-resources', 'create', 'p3d'] and '--spot' in create
  assert '--runtime-version=v2-alpha-tpuv5-lite' in create and '--node-id=p3d' in create
  assert wait[3:5] == ['queued-resources', 'describe']
  runner, _ = _tpu_vm('create', '--dry-run', accelerator='v4-32')
  [create] = runner.commands
  assert create[3:6] == ['tpu-vm', 'create', 'p3d'] and '--version=tpu-ubuntu2204-base' in create


def test_tpu_vm_setup_installs_on_every_worker():
  runner, _ = _tpu_vm('setup', '--dry-run')
  build, scp, _ = runner.commands
  assert build[1:4] == ['-m', 'pip', 'wheel'] and '--worker=all' in scp
  wheel = '/tmp/triplane3d-0.1.0-py3-none-any.whl'
  assert _ssh_scripts(runner) == [
    ('--worker=all', f'--command=python3 -m pip install --upgrade "{wheel}[tpu]"\n'
     f'python3 -m pip install --force-reinstall --no-deps {wheel}')
  ]  # fmt: skip


class _Gcloud:
  """Stands in for subprocess.run: records commands, answers state queries from a script."""

  def __init__(self, monkeypatch, answers):
    self.calls, self.answers = [], list(answers)
    monkeypatch.setattr(subprocess, 'run', self)

  def __call__(self, cmd, **kwargs):
    self.calls.append(cmd)
    stdout = self.answers.pop(0) if kwargs.get('capture_output') else ''
    return subprocess.CompletedProcess(cmd, 0 if stdout is not None else 1, stdout or '', '')


def _started_scripts(calls):
  commands = [a for c in calls if c[3:5] == ['tpu-vm', 'ssh'] for a in c if a.startswith('--c')]
  return [c for c in commands if 'nohup' in c]


def test_tpu_vm_resume_after_preemption_recreates_and_continues_the_same_workdir(monkeypatch):
  flags = ('--spot', f'--bucket={BUCKET}', '--install=triplane3d[tpu]==0.1.0', '--poll=0')
  fake = _Gcloud(monkeypatch, [])
  _tpu_vm('run', *flags)
  [first_start] = _started_scripts(fake.calls)

  fake = _Gcloud(monkeypatch, ['SUSPENDED', 'PROVISIONING', 'ACTIVE'])  # Preempted, then back.
  _tpu_vm('resume', *flags)
  steps = [' '.join(c[3:5]) for c in fake.calls]
  assert steps == [
    'queued-resources describe', 'queued-resources delete', 'queued-resources create',
    'queued-resources describe', 'queued-resources describe', 'tpu-vm ssh', 'tpu-vm ssh',
  ]  # fmt: skip
  assert _started_scripts(fake.calls) == [first_start]  # Same command, same workdir.
  # Nothing else is redone: no data preparation, nothing removed from the bucket.
  everything = ' '.join(' '.join(c) for c in fake.calls)
  for absent in ('precompute_depth', 'import_folder', 'storage rm', 'gsutil'):
    assert absent not in everything

  fake = _Gcloud(monkeypatch, ['ACTIVE'])  # Slice healthy (e.g. the process was killed).
  _tpu_vm('resume', *flags)
  assert [' '.join(c[3:5]) for c in fake.calls] == ['queued-resources describe', 'tpu-vm ssh']


def test_tpu_vm_watch_resumes_until_finished(monkeypatch):
  done = 'I0101 main.py] finished at step 25020 (preempted: False)'
  # (state, probe) pairs; None: ssh failed (retried), then a preemption (resume: state query
  # None = slice gone, create, wait for ACTIVE), then the run finishes.
  answers = ['ACTIVE', None, 'ACTIVE', 'running', 'SUSPENDED', None, 'ACTIVE', 'ACTIVE', done]
  fake = _Gcloud(monkeypatch, answers)
  flags = (f'--bucket={BUCKET}', '--queued', '--install=x', '--poll=0')
  _tpu_vm('watch', *flags)
  assert not fake.answers and len(_started_scripts(fake.calls)) == 1
  _Gcloud(monkeypatch, ['ACTIVE', 'Traceback ...\nValueError: boom'])
  with pytest.raises(shell.LaunchError, match='stopped without finishing'):
    _tpu_vm('watch', *flags)


def test_tpu_vm_dry_run_resume_shows_the_recreate_path():
  runner, text = _tpu_vm('resume', '--queued', f'--bucket={BUCKET}', '--dry-run')
  steps = [' '.join(c[3:5]) for c in runner.commands if c[0] == 'gcloud']
  assert steps[:3] == ['queued-resources describe', 'queued-resources delete',
                       'queued-resources create']  # fmt: skip
  assert steps[-1] == 'tpu-vm ssh' and 'the bucket and its checkpoints stay' in text


@pytest.mark.parametrize(
  'flags, says',
  [
    (('run',), 'gcloud storage buckets create'),
    (('resume', '--bucket=my-bucket'), 'gs://NAME'),
    (('run', f'--bucket={BUCKET}', '--config=my_exp.py'), 'configs/NAME.py'),
    (('create', '--accelerator=v3-8'), 'v5litepod-N'),
  ],
)
def test_tpu_vm_bad_input_says_how_to_fix_it(flags, says):
  action, *rest = flags  # Flags given last win over the defaults before them.
  with pytest.raises(shell.LaunchError, match=says):
    tpu_vm.main([action, '--name=p3d', '--zone=z', '--accelerator=v4-8', '--dry-run', *rest])


def test_bad_name_and_cli_exit(monkeypatch):
  argv = ['tpu_vm', 'create', '--name=My_Run', '--zone=z', '--accelerator=v4-8']
  monkeypatch.setattr(sys, 'argv', argv)
  with pytest.raises(SystemExit, match='lowercase letters'):
    shell.cli(tpu_vm.main)


def _gke(action, *flags, accelerator='v5litepod-16'):
  out = io.StringIO()
  base = [action, '--name=vitb', f'--accelerator={accelerator}', f'--bucket={BUCKET}']
  runner = gke.main([*base, '--install=triplane3d[tpu] @ git+https://x/y.git', *flags], out)
  return runner, out.getvalue()


@pytest.mark.parametrize(
  'accelerator, hosts, chips, topo', [('v5litepod-16', 4, 4, '4x4'), ('v4-32', 4, 4, '2x2x4'),
                                      ('v6e-8', 1, 8, '2x4')],
)  # fmt: skip
def test_gke_jobset_has_one_pod_per_host_with_the_same_command(accelerator, hosts, chips, topo):
  job = gke.parse(['apply', '--name=vitb', f'--accelerator={accelerator}', f'--bucket={BUCKET}',
                   '--install=none', '--spot', '--', '--config.x=1'])[1]  # fmt: skip
  manifest = gke.jobset(job)
  [replicated] = manifest['spec']['replicatedJobs']
  spec = replicated['template']['spec']
  assert replicated['replicas'] == 1 and spec['parallelism'] == spec['completions'] == hosts
  pod = spec['template']['spec']
  assert pod['nodeSelector'] == {
    'cloud.google.com/gke-tpu-accelerator': job.tpu.gke_accelerator,
    'cloud.google.com/gke-tpu-topology': topo,
    'cloud.google.com/gke-spot': 'true',
  }
  [container] = pod['containers']  # One template: every pod runs the same command.
  assert container['resources']['limits'] == {'google.com/tpu': chips}
  assert f'--workdir={BUCKET}/vitb --config.x=1 &' in container['command'][-1]
  assert yaml.safe_load(gke.manifest(job)) == manifest


def test_gke_apply_and_resume():
  runner, text = _gke('apply', '--dry-run')
  assert runner.commands == [['kubectl', '--namespace=default', 'apply', '-f',
                              'triplane3d-vitb.jobset.yaml']]  # fmt: skip
  assert "cat > triplane3d-vitb.jobset.yaml <<'EOF'\napiVersion: jobset.x-k8s.io/v1alpha2" in text
  resumed, resumed_text = _gke('resume', '--dry-run')
  assert resumed.commands[0][2:5] == ['delete', 'jobset', 'vitb']
  assert resumed.commands[1:] == runner.commands and text.split('EOF')[1] in resumed_text
  pool, _ = _gke('nodepool', '--dry-run', '--cluster=c', '--location=us-west4')
  assert (
    '--machine-type=ct5lp-hightpu-4t' in pool.commands[0] and '--num-nodes=4' in pool.commands[0]
  )


@pytest.mark.parametrize(
  'flags, says',
  [(('--install=none',), 'gcloud storage buckets create'),
   ((f'--bucket={BUCKET}',), '--install=none with an --image')],
)  # fmt: skip
def test_gke_bad_input_says_how_to_fix_it(flags, says):
  with pytest.raises(shell.LaunchError, match=says):
    gke.main(['apply', '--name=vitb', '--accelerator=v4-8', *flags, '--dry-run'])


@pytest.fixture
def fakes(tmp_path):
  """A PATH with a fake trainer `python3 -m ...` (saves on SIGTERM, exit 0) and fake Slurm."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  scripts = {
    'python3': f"""#!/bin/bash
if [ "$1" != "-m" ]; then exec {sys.executable} "$@"; fi
trap 'echo saved >> {tmp_path}/calls; exit 0' TERM
echo "$$ $*" > {tmp_path}/started.tmp && mv {tmp_path}/started.tmp {tmp_path}/started
for i in $(seq ${{FAKE_STEPS:-100}}); do sleep 0.05; done
exit ${{FAKE_RC:-0}}""",
    'srun': '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"',
    'scancel': f'#!/bin/bash\necho "scancel $*" >> {tmp_path}/calls\n'
    f'kill -TERM "$(cut -d" " -f1 {tmp_path}/started)"',
    'scontrol': f'#!/bin/bash\necho "scontrol $*" >> {tmp_path}/calls',
  }
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='42')
  return tmp_path, env


def _run_bash(script, env, tmp_path, send=None):
  (tmp_path / 'job.sh').write_text(script)
  proc = subprocess.Popen(['bash', str(tmp_path / 'job.sh')], env=env)
  if send:
    deadline = time.monotonic() + 5
    while not (tmp_path / 'started').exists() and time.monotonic() < deadline:
      time.sleep(0.02)
    proc.send_signal(send)
  return proc.wait(timeout=10)


def test_gke_pod_fails_after_sigterm_so_the_jobset_restarts_the_slice(fakes):
  tmp_path, env = fakes
  job = gke.Job(name='r', tpu=topology.parse('v6e-16'), bucket=BUCKET, install='none')
  assert _run_bash(gke.pod_script(job), env, tmp_path, send=signal.SIGTERM) == 143
  assert (tmp_path / 'calls').read_text() == 'saved\n'  # The trainer got SIGTERM and saved.
  assert f'--workdir={BUCKET}/r' in (tmp_path / 'started').read_text()
  assert _run_bash(gke.pod_script(job), dict(env, FAKE_RC='3', FAKE_STEPS='1'), tmp_path) == 3


def test_slurm_script_layout():
  out = io.StringIO()
  slurm.main(['--name=vitb', '--nodes=2', '--gpus-per-node=8', '--workdir=/shared/vitb',
              '--tasks=node', '--dry-run', '--', '--config.x=1'], out)  # fmt: skip
  text = out.getvalue()
  for line in ('--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8', '--requeue',
               '--signal=B:USR1@300'):  # fmt: skip
    assert f'#SBATCH {line}\n' in text
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in text
  assert 'srun --kill-on-bad-exit=1 python3 -m triplane3d.main --config=configs/vitb.py ' \
         '--workdir=/shared/vitb --config.x=1 &' in text  # fmt: skip
  assert text.rstrip().endswith('sbatch triplane3d-vitb.sbatch')
  with pytest.raises(shell.LaunchError, match='absolute path'):
    slurm.main(['--name=vitb', '--workdir=runs/vitb', '--dry-run'])


def test_slurm_time_limit_checkpoints_then_requeues(fakes):
  tmp_path, env = fakes
  job = slurm.Job(name='vitb', workdir='/shared/vitb', nodes=1, gpus_per_node=1)
  assert _run_bash(slurm.script(job), env, tmp_path, send=signal.SIGUSR1) == 0
  calls = (tmp_path / 'calls').read_text().splitlines()
  assert calls == ['scancel --signal=TERM 42', 'saved', 'scontrol requeue 42']
