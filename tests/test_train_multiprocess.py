"""Real multi-host training (2 processes × 4 CPU devices, jax.distributed + gloo, fsdp across
both), and a
SIGTERM during a real `python -m triplane3d.main` run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multiprocess import run_processes
from tiny import tiny_config
from xla_env import subprocess_env

from triplane3d import checkpoint, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic_mp'))


@pytest.mark.slow
def test_two_hosts_train_checkpoint_restore_like_one(data_dir, tmp_path):
  single = train.run(tiny_config(data_dir), str(tmp_path / 'single'))
  workdir = str(tmp_path / 'multi')
  target = str(REPO / 'tests' / 'train_worker.py') + ':main'
  first = run_processes(target, args=(data_dir, workdir, '2'), timeout=400)
  second = run_processes(target, args=(data_dir, workdir, '4'), timeout=400)
  for per_process in (first, second):
    assert len(per_process) == 2
    # Every host sees the same global losses.
    assert per_process[0][0]['losses'] == per_process[1][0]['losses']
  assert first[0][0]['step'] == 2 and second[0][0]['step'] == 4
  assert sorted(second[0][0]['losses']) == ['3', '4']  # Resumed, not restarted.
  multi = {**first[0][0]['losses'], **second[0][0]['losses']}
  for s in (1, 2, 3, 4):
    np.testing.assert_allclose(multi[str(s)], single['losses'][s], rtol=1e-5, err_msg=f'step {s}')


def _main_cmd(data_dir, workdir, *extra):
  return [
    sys.executable, '-m', 'triplane3d.main', f'--config={REPO}/tests/tiny.py:{data_dir}',
    f'--workdir={workdir}', '--config.train.ckpt_every_steps=100000', *extra,
  ]  # fmt: skip


def _steps_logged(workdir):
  path = Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line)['step'] for line in path.read_text().splitlines() if line.strip()]


def _stop_with(sig, data_dir, workdir, after):
  """Starts an endless run on `workdir`, sends `sig` once `after` steps are logged; checks that
  it saved the step it reached and exited 0. Returns (that step, the run's stderr)."""
  proc = subprocess.Popen(
    _main_cmd(data_dir, workdir, '--config.train.num_steps=100000'),
    env=subprocess_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  try:
    deadline = time.monotonic() + 300
    while len(_steps_logged(workdir)) < after:
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, 'training did not get far enough in time'
      time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, (sig, err.decode()[-3000:])
  with checkpoint.Checkpointer(workdir) as ckpt:
    saved = ckpt.latest_step
  assert saved is not None and saved >= after, (sig, saved)
  assert saved == _steps_logged(workdir)[-1], sig  # Saved exactly where it stopped.
  return saved, err.decode()


def test_signals_checkpoint_exit_cleanly_and_resume(data_dir, tmp_path):
  """Preemption (SIGTERM) and Ctrl-C (SIGINT) both save the step reached and exit 0; the run
  resumed after each continues with the next step."""
  workdir = str(tmp_path / 'preempt')
  saved, _ = _stop_with(signal.SIGTERM, data_dir, workdir, after=3)
  again, err = _stop_with(signal.SIGINT, data_dir, workdir, after=saved + 2)
  assert f'resumed from step {saved}' in err
  assert _steps_logged(workdir)[saved : saved + 2] == [saved + 1, saved + 2]
  done = subprocess.run(
    _main_cmd(data_dir, workdir, f'--config.train.num_steps={again + 2}'),
    env=subprocess_env(),
    capture_output=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  assert f'resumed from step {again}' in done.stderr.decode()
  assert _steps_logged(workdir)[-2:] == [again + 1, again + 2]


def test_demo_command_leaves_checkpoints_logs_and_pngs(tmp_path):
  workdir = tmp_path / 'demo'
  cmd = [
    sys.executable, '-m', 'triplane3d.main', f'--workdir={workdir}',
    '--config.train.num_steps=3', '--config.data.num_synthetic=32', '--config.train.batch_size=4',
    '--config.train.image_every_steps=2', '--config.train.log_every_steps=1',
    '--config.eval.num_heldout=8',  # Not 64: scored twice here, ~25 s less on 2 cores.
  ]  # fmt: skip
  done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, timeout=600)
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  assert (workdir / 'checkpoints' / '3').is_dir()
  assert list((workdir / 'tb').glob('events.out.tfevents.*'))
  assert sorted(p.name for p in (workdir / 'images').glob('*.png')) == [
    'step_0000000.png', 'step_0000002.png', 'step_0000003.png'
  ]  # fmt: skip
  assert _steps_logged(workdir) == [1, 2, 3]
  # Held-out reconstruction numbers beside the trivial baselines, printed and in the log.
  last = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  keys = ('psnr', 'depth_abs', 'baseline_psnr', 'baseline_depth_abs')
  assert {f'heldout/{k}' for k in keys} <= set(last), last
  assert 'held-out PSNR' in done.stdout.decode() + done.stderr.decode()


def test_unknown_config_field_is_an_error(tmp_path):
  cmd = [sys.executable, '-m', 'triplane3d.main', f'--workdir={tmp_path}', '--config.model.bogus=1']
  done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, timeout=120)
  assert done.returncode != 0
  assert 'bogus' in done.stderr.decode()
