"""Fault injection: `python -m triplane3d.main` killed with SIGKILL at seeded random points
(before the first checkpoint, during an asynchronous checkpoint save, between checkpoints) and
restarted on the same workdir ends bit for bit where an uninterrupted run ends: parameters,
optimiser state, data-iterator position, and the loss terms of every step in metrics.jsonl.

Kill points are found by polling the workdir, never by fixed sleeps, so that a slow, loaded
machine moves them in time but not in kind. A save in progress is visible as orbax's
`checkpoints/<step>.orbax-checkpoint-tmp` directory, renamed to `<step>` only once complete.
At a kill point the process is frozen with SIGSTOP (nothing runs or reaches the disk until
the SIGKILL that follows, so this is a SIGKILL at that instant); for a kill inside a save the
frozen process is checked to still have its save unfinished, else it resumes and the next
save is taken. What each kill interrupted is read afterwards from the dead process's files
(a temporary step directory left behind = inside a save), and the test requires each kind at
least once. `TRIPLANE3D_FAULT_SEED=<n>` draws other kill points (the default seed keeps the
test reproducible); each kill is printed (`pytest -s`) with what it interrupted.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import tiny_config
from xla_env import subprocess_env

from triplane3d import checkpoint
from triplane3d.data import pipeline

REPO = Path(__file__).resolve().parent.parent
NUM_STEPS, CKPT_EVERY = 10, 3  # Checkpoints 3, 6, 9 and the final 10; keep_ckpts=3 prunes 3.
SAVE_STEPS = [s for s in range(CKPT_EVERY, NUM_STEPS, CKPT_EVERY)]  # Saves with one after them.
TMP = '.orbax-checkpoint-tmp'
# Wall-clock numbers: the only keys allowed to differ.
TIMING = {'first_step_s', 'images_per_sec', 'data_wait'}
TIMEOUT_S = 300  # Per process; a loaded 2-core machine takes ~15 s to start one.
BEFORE, DURING, BETWEEN = 'before the first checkpoint', 'during a save', 'between checkpoints'
PLAN = [BEFORE, DURING, BETWEEN, DURING]  # Then one run to the end.
MAX_KILLS = 6
STARTED = 'compiled and ran the first step'  # The trainer's log line after its first step.


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('synthetic_faults'))
  # Generated here, once: the reference and the killed runs start concurrently and must not
  # both write the dataset (a kill in the middle would also leave it half-written).
  pipeline.prepare(tiny_config(d))
  return d


def _start(data_dir, workdir, err_path):
  cmd = [
    sys.executable, '-m', 'triplane3d.main', f'--config={REPO}/tests/tiny.py:{data_dir}',
    f'--workdir={workdir}', f'--config.train.num_steps={NUM_STEPS}',
    f'--config.train.ckpt_every_steps={CKPT_EVERY}',
  ]  # fmt: skip
  # One CPU device in every process (not the test process's 8): the killed runs and the
  # reference must compile the same programs to agree bit for bit. The persistent compilation
  # cache (conftest) is inherited, so only the first process compiles.
  env = subprocess_env()
  with open(err_path, 'w') as err:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)


def _metrics(workdir) -> list[dict]:
  path = Path(workdir) / 'metrics.jsonl'
  lines = path.read_text().splitlines() if path.exists() else []
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # A line being written as we read.
      break
  return out


def _logged(workdir) -> int:
  """The last step in metrics.jsonl (0: none)."""
  return max((m['step'] for m in _metrics(workdir)), default=0)


def _saving(workdir) -> list[int]:
  """Steps whose save is in progress (or was cut off): orbax's temporary step directories."""
  root = Path(workdir) / checkpoint.CHECKPOINTS
  names = os.listdir(root) if root.is_dir() else []
  return sorted(int(n.split('.')[0]) for n in names if TMP in n and n.split('.')[0].isdigit())


def _wait(proc, err_path, ready, what):
  """Polls `ready()` every 10 ms until it returns something true; fails if `proc` ends first."""
  deadline = time.monotonic() + TIMEOUT_S
  while True:
    if found := ready():
      return found
    if proc.poll() is not None:
      tail = Path(err_path).read_text(errors='replace')[-3000:]
      raise AssertionError(f'the trainer exited ({proc.returncode}) before {what}:\n{tail}')
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def _kill_point(kind, proc, err_path, workdir, resumed_from, rng) -> str:
  """Waits for a seeded random point of the given kind in the running trainer and stops the
  process there (SIGSTOP: nothing runs or is written until the SIGKILL that follows).
  Returns a description of the point."""
  # Until this process has restored and run a step, the workdir still shows the previous
  # one's metrics and unfinished saves (cleaned up at start-up).
  _wait(proc, err_path, lambda: STARTED in Path(err_path).read_text(errors='replace'), STARTED)
  if kind == BEFORE:
    step = rng.choice(range(1, CKPT_EVERY))  # Logged; the first save is ~0.5 s away.
    _wait(proc, err_path, lambda: _logged(workdir) >= step, f'step {step} logged')
    proc.send_signal(signal.SIGSTOP)
    return f'after step {step} was logged'
  if kind == BETWEEN:
    # Steps take ~30 ms and a save ~0.5 s, so a save runs almost all the time once the first
    # has started; the gap is right after a resume, before the next save begins.
    step = rng.choice([s for s in range(resumed_from + 1, NUM_STEPS) if s % CKPT_EVERY][:2])
    _wait(proc, err_path, lambda: _logged(workdir) >= step, f'step {step} logged')
    proc.send_signal(signal.SIGSTOP)
    return f'after step {step} was logged'
  # DURING: a save of `target` or later has started; let it run a random while (a save takes
  # ~0.5 s here), freeze the process and kill it if the save is still unfinished, else let it
  # go on to the next save.
  # Not the first save: a checkpoint to resume from keeps the between-checkpoints kill possible.
  target = rng.choice([s for s in SAVE_STEPS if s > max(resumed_from, CKPT_EVERY)] or [NUM_STEPS])
  delay = rng.uniform(0.0, 0.2)
  while True:
    saving = _wait(
      proc, err_path, lambda t=target: [s for s in _saving(workdir) if s >= t], f'save of {target}'
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGSTOP)
    if set(saving) & set(_saving(workdir)):
      return f'{delay * 1000:.0f} ms into the save of step {saving[0]}'
    proc.send_signal(signal.SIGCONT)  # That save was quicker than the delay: the next, at once.
    target, delay = saving[0] + 1, 0.0


def _interrupted(workdir) -> set[str]:
  """What a dead process was doing, read from what it left on disk."""
  kinds = set()
  if _saving(workdir):
    kinds.add(DURING)  # A temporary step directory that was never renamed.
  done = checkpoint.finished_steps(workdir)
  if not done:
    kinds.add(BEFORE)
  elif not kinds and _logged(workdir) > done[-1]:
    kinds.add(BETWEEN)  # Steps logged past the last checkpoint, to be run again.
  return kinds


def _state(workdir, step) -> dict:
  """The whole saved train state (step, params, optimiser state) as {path: numpy array}."""
  path = Path(workdir) / checkpoint.CHECKPOINTS / str(step) / checkpoint.STATE
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _data_state(workdir, step) -> str:
  path = Path(workdir) / checkpoint.CHECKPOINTS / str(step) / checkpoint.DATA
  return (path / 'process_0-of-1.json').read_text()


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(data_dir, tmp_path):
  seed = int(os.environ.get('TRIPLANE3D_FAULT_SEED', '0'))
  rng = random.Random(seed)
  reference = str(tmp_path / 'reference')
  ref_err = tmp_path / 'reference.err'
  ref_proc = _start(data_dir, reference, ref_err)  # Runs alongside the killed ones,
  # once it has compiled: the killed runs then load its programs from the persistent
  # compilation cache instead of compiling the same ones at the same time (~35 s of CPU).
  _wait(ref_proc, ref_err, lambda: STARTED in ref_err.read_text(errors='replace'), STARTED)
  workdir = str(tmp_path / 'killed')
  kills = []
  plan = list(PLAN)
  try:
    for i in range(MAX_KILLS + 1):
      done = checkpoint.finished_steps(workdir)
      resumed_from = done[-1] if done else 0
      # A kind whose kill landed elsewhere is tried again (BETWEEN needs a checkpoint with
      # steps after it), up to MAX_KILLS kills; then the run goes to the end.
      kind = plan.pop(0) if plan and i < MAX_KILLS else None
      if kind == BEFORE and done:  # Too late (the coverage check below will say so).
        kind = plan.pop(0) if plan else None
      if kind == BETWEEN and not (done and done[-1] < SAVE_STEPS[-1]):
        kind, plan = DURING, [BETWEEN, *plan]
      err_path = tmp_path / f'run{i}.err'
      proc = _start(data_dir, workdir, err_path)
      try:
        if kind is None:
          proc.wait(timeout=TIMEOUT_S)
          assert proc.returncode == 0, err_path.read_text(errors='replace')[-3000:]
        else:
          where = _kill_point(kind, proc, err_path, workdir, resumed_from, rng)
          proc.send_signal(signal.SIGKILL)
          assert proc.wait(timeout=60) == -signal.SIGKILL
          got = _interrupted(workdir)
          kills.append(got)
          if kind not in got and kind not in set().union(*kills):
            plan.insert(0, kind)
          left = sorted(os.listdir(Path(workdir) / checkpoint.CHECKPOINTS))
          print(f'seed {seed} kill {i + 1}: {where}; interrupted {sorted(got)}; left {left}')
      finally:
        proc.kill()
        proc.wait()
      # Every process resumed from the newest finished checkpoint: none was lost or skipped.
      log = err_path.read_text(errors='replace')
      if resumed_from:
        assert f'resumed from step {resumed_from}' in log, log[-3000:]
      else:
        assert 'resumed from step' not in log, log[-3000:]
      if kind is None:
        break
    ref_proc.wait(timeout=TIMEOUT_S)
    assert ref_proc.returncode == 0, ref_err.read_text(errors='replace')[-3000:]
  finally:
    ref_proc.kill()
    ref_proc.wait()

  # The kill points covered what they were meant to (read from the files, not the plan).
  assert {BEFORE, DURING, BETWEEN} <= set().union(*kills), kills
  ckpt_dir = Path(workdir) / checkpoint.CHECKPOINTS
  assert not _saving(workdir), os.listdir(ckpt_dir)  # Cut-off saves were cleaned up.
  assert not (Path(workdir) / checkpoint.CORRUPT).exists()  # No kill damaged a finished one.

  # Same checkpoints, bit for bit: step, parameters, Adam moments, the data position.
  steps = checkpoint.finished_steps(reference)
  assert steps[-1] == NUM_STEPS and set(steps) <= set(checkpoint.finished_steps(workdir))
  for step in steps:
    want, got = _state(reference, step), _state(workdir, step)
    assert sorted(got) == sorted(want), f'step {step}: the saved trees differ'
    assert any('opt_state' in k for k in want) and any('params' in k for k in want)
    for key, a in want.items():
      assert got[key].dtype == a.dtype, f'step {step}: {key}'
      np.testing.assert_array_equal(got[key], a, err_msg=f'step {step}: {key}')
    assert _data_state(workdir, step) == _data_state(reference, step), f'step {step}'

  # Every step logged once (the resumed run's line wins), with the uninterrupted values.
  want = _metrics(reference)
  got = _metrics(workdir)
  assert [m['step'] for m in want] == list(range(1, NUM_STEPS + 1))
  assert [m['step'] for m in got] == list(range(1, NUM_STEPS + 1))
  for w, g in zip(want, got, strict=True):
    w = {k: v for k, v in w.items() if k not in TIMING}
    g = {k: v for k, v in g.items() if k not in TIMING}
    assert g == w, f'step {w["step"]}'
    assert 'total' in w and 'grad_norm' in w
