"""Real multi-process JAX on localhost, for tests: N python processes, one jax.distributed job.

`run_processes(target, num_processes=2, devices_per_process=4, args=(...))` starts N copies
of this file as scripts. Each one, before importing jax, gets its own environment
(`--xla_force_host_platform_device_count=4`, *not* the test process's 8-device XLA_FLAGS),
switches CPU collectives to gloo, calls `jax.distributed.initialize` against a free localhost
port, then runs `target` with `sys.argv = [target, *args]`:

- `'path/to/file.py:function'` or `'package.module:function'`: calls `function()`;
- `'path/to/file.py'` or `'package.module'`: runs it as `__main__`.

A worker reports results with `emit(obj)` (one JSON line on stdout); `run_processes` returns,
per process in process-id order, the list of objects it emitted. Any non-zero exit or a
timeout kills the remaining processes and fails with every process's stderr tail.
`launch(...)` is the non-blocking form, for tests that signal a running worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_MARK = '@@RESULT@@ '
_REPO = Path(__file__).resolve().parent.parent
_ENV_PREFIX = 'TP3D_MP_'


def emit(obj) -> None:
  """Reports one JSON-serialisable result from a worker to `run_processes`."""
  print(_MARK + json.dumps(obj), flush=True)


@dataclass
class Job:
  """N running worker processes (from `launch`)."""

  procs: list[subprocess.Popen]
  logdir: Path
  timeout: float
  started: float = field(default_factory=time.monotonic)

  def _tail(self, i: int, name: str, n: int = 4000) -> str:
    text = (self.logdir / f'{i}.{name}').read_text(errors='replace')
    return text[-n:]

  def _failure(self, why: str) -> str:
    parts = [why]
    for i, p in enumerate(self.procs):
      parts.append(f'--- process {i} (exit {p.returncode}) stderr ---\n{self._tail(i, "err")}')
    return '\n'.join(parts)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      p.wait()

  def wait(self, expect_returncode: int = 0) -> list[list]:
    """Waits for all processes; returns each one's emitted objects (process-id order)."""
    while True:
      codes = [p.poll() for p in self.procs]
      bad = [i for i, c in enumerate(codes) if c is not None and c != expect_returncode]
      if bad:
        # One process died: the others would wait for it forever in a collective.
        time.sleep(0.5)  # Let a sibling's error reach its stderr too.
        self.kill()
        raise AssertionError(self._failure(f'process {bad} exited with {codes[bad[0]]}'))
      if all(c is not None for c in codes):
        break
      if time.monotonic() - self.started > self.timeout:
        self.kill()
        raise AssertionError(self._failure(f'timed out after {self.timeout:.0f} s'))
      time.sleep(0.05)
    results = []
    for i in range(len(self.procs)):
      out = (self.logdir / f'{i}.out').read_text()
      results.append([json.loads(l[len(_MARK) :]) for l in out.splitlines() if l.startswith(_MARK)])
    return results


def launch(
  target: str,
  num_processes: int = 2,
  devices_per_process: int = 4,
  args: Sequence[str] = (),
  timeout: float = 120.0,
  logdir: str | os.PathLike | None = None,
  env: dict[str, str] | None = None,
) -> Job:
  """Starts the workers and returns at once; see the module docstring."""
  import tempfile

  import portpicker
  import xla_env

  logdir = Path(logdir or tempfile.mkdtemp(prefix='mp_logs_'))
  logdir.mkdir(parents=True, exist_ok=True)
  port = portpicker.pick_unused_port()
  base = xla_env.subprocess_env(devices_per_process, **(env or {}))
  base.update(
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join([str(_REPO), base.get('PYTHONPATH', '')]).rstrip(os.pathsep),
    PYTHONUNBUFFERED='1',
  )
  procs = []
  for i in range(num_processes):
    penv = dict(base)
    penv.update(
      {
        _ENV_PREFIX + 'COORD': f'127.0.0.1:{port}',
        _ENV_PREFIX + 'N': str(num_processes),
        _ENV_PREFIX + 'ID': str(i),
      }
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), target, *map(str, args)]
    with open(logdir / f'{i}.out', 'w') as out, open(logdir / f'{i}.err', 'w') as err:
      procs.append(subprocess.Popen(cmd, env=penv, stdout=out, stderr=err, cwd=_REPO))
  return Job(procs, logdir, timeout)


def run_processes(
  target: str,
  num_processes: int = 2,
  devices_per_process: int = 4,
  args: Sequence[str] = (),
  timeout: float = 120.0,
  env: dict[str, str] | None = None,
) -> list[list]:
  """Runs `target` in N jax.distributed processes; returns each one's emitted objects."""
  job = launch(target, num_processes, devices_per_process, args, timeout, env=env)
  return job.wait()


def _worker_main() -> None:
  """Entry point of one worker: join the distributed job, then run the target."""
  import jax

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=os.environ[_ENV_PREFIX + 'COORD'],
    num_processes=int(os.environ[_ENV_PREFIX + 'N']),
    process_id=int(os.environ[_ENV_PREFIX + 'ID']),
  )
  import runpy

  target = sys.argv[1]
  sys.argv = [target, *sys.argv[2:]]
  where, _, func = target.partition(':')
  if where.endswith('.py'):
    namespace = runpy.run_path(where, run_name='__main__' if not func else '__mp_worker__')
  else:
    namespace = runpy.run_module(where, run_name='__main__' if not func else '__mp_worker__')
  if func:
    namespace[func]()
  jax.distributed.shutdown()


if __name__ == '__main__':
  _worker_main()
