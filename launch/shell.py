"""What every launcher shares: dry-run vs real execution, input checks, the training command.

A `Runner` either runs commands (`subprocess.run`, each one echoed first) or, with
`dry_run=True`, prints them as a shell script that can be pasted as is, and runs nothing.
Launchers build every command through it, so `--dry-run` shows exactly what a real run does.

The training command is the same everywhere: `python3 -m triplane3d.main --config=configs/X.py
--workdir=DIR [extra flags]`, started from the installed package's directory so that
`configs/X.py` names the config installed with the package on every worker (pyproject maps
configs/ to triplane3d/configs/). A rerun on the same workdir resumes (main.py).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from triplane3d import run_config


class LaunchError(ValueError):
  """Bad launcher input or an unreachable state; the message names the flag and the fix."""


class Runner:
  """Runs commands, or (dry_run) prints them and runs nothing. `commands` records both."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.commands: list[list[str]] = []

  def say(self, text: str) -> None:
    for line in text.splitlines():
      print(f'# {line}'.rstrip(), file=self.out, flush=True)

  def run(self, cmd: Sequence[str]) -> None:
    cmd = list(cmd)
    self.commands.append(cmd)
    print(shlex.join(cmd) if self.dry_run else f'$ {shlex.join(cmd)}', file=self.out, flush=True)
    if not self.dry_run:
      subprocess.run(cmd, check=True)

  def query(self, cmd: Sequence[str]) -> str | None:
    """The command's stripped stdout, None if it failed (e.g. no such TPU) or in a dry run."""
    cmd = list(cmd)
    self.commands.append(cmd)
    if self.dry_run:
      self.say(f'reads: {shlex.join(cmd)}')
      return None
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None

  def wait_for(self, cmd: Sequence[str], want: str, timeout_s: float, poll_s: float = 30) -> None:
    """Polls `cmd` until it prints `want` (e.g. a queued resource becoming ACTIVE)."""
    if self.dry_run:
      self.commands.append(list(cmd))
      print(f'until [ "$({shlex.join(cmd)})" = {want} ]; do sleep {poll_s:g}; done', file=self.out)
      return
    deadline = time.monotonic() + timeout_s
    while (state := self.query(cmd)) != want:
      if time.monotonic() > deadline:
        raise LaunchError(
          f'still {state or "unknown"} after {timeout_s:g} s (wanted {want}): raise '
          f'--timeout, or check capacity and quota, then rerun the same command'
        )
      print(f'# state {state or "unknown"}, waiting for {want}', file=self.out, flush=True)
      time.sleep(poll_s)

  def write(self, path: str, text: str) -> None:
    """Writes a file (a dry run prints it as a heredoc instead)."""
    if self.dry_run:
      print(f"cat > {shlex.quote(path)} <<'EOF'\n{text.rstrip()}\nEOF", file=self.out)
      return
    with open(path, 'w') as f:
      f.write(text)
    print(f'# wrote {path}', file=self.out, flush=True)


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `[own flags] -- [flags for triplane3d.main]`."""
  argv = list(argv)
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1 :]
  return argv, []


def check_name(name: str) -> str:
  """TPU, queued-resource, JobSet and job names: lowercase letters, digits and hyphens."""
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,38}[a-z0-9])?', name or ''):
    raise LaunchError(
      f'--name={name!r}: use 1-40 lowercase letters, digits and hyphens, starting with a letter '
      'and not ending with a hyphen (e.g. --name=vitb-v5e)'
    )
  return name


def check_bucket(bucket: str | None) -> str:
  """'gs://name[/prefix]' without a trailing slash, or an error saying how to get one."""
  if not bucket:
    raise LaunchError(
      '--bucket is required: checkpoints must outlive the machines so a recreated slice can '
      'resume. Create one in the region of your zone: gcloud storage buckets create '
      'gs://NAME --location=REGION, then pass --bucket=gs://NAME'
    )
  if not bucket.startswith('gs://') or len(bucket.rstrip('/')) <= len('gs://'):
    raise LaunchError(f'--bucket={bucket!r}: expected gs://NAME (a Cloud Storage bucket)')
  return bucket.rstrip('/')


def check_config(config: str, allow_paths: bool = False) -> str:
  """Checks that `config` (configs/NAME.py[:ARG]) exists in the installed package.

  Remote workers only have the installed package, so the config must be one of its files
  (add yours to configs/ first). `allow_paths` also accepts an absolute path, for clusters
  whose nodes share a filesystem with the submitting machine (SLURM).
  """
  path = config.split(':', 1)[0]
  if allow_paths and os.path.isabs(path):
    if not os.path.isfile(path):
      raise LaunchError(f'--config={config!r}: no such file')
    return config
  head, name = os.path.split(os.path.normpath(path))
  installed = run_config.config_file(name)
  if head != 'configs' or not name.endswith('.py') or not os.path.isfile(installed):
    raise LaunchError(
      f'--config={config!r}: workers only see the configs installed with the package; pass '
      f'--config=configs/NAME.py for a file in configs/ (add yours there first)'
      + (', or an absolute path on the shared filesystem' if allow_paths else '')
    )
  return config


# Run from the directory that holds the installed configs/ (site-packages/triplane3d for a wheel,
# the checkout for an editable install): there `configs/NAME.py` is the installed config.
# Two lines, not `cd "$(...)"`: under `set -e` a failed import must stop the script, and `cd ""`
# would succeed. No single quotes in remote scripts: they stay readable inside '--command=...'.
CD_PACKAGE = (
  'pkg="$(python3 -c "import os, triplane3d.configs as c; print(os.path.dirname(c.__path__[0]))")"\n'
  'cd "$pkg"'
)


def main_command(config: str, workdir: str, extra: Sequence[str]) -> str:
  """The training command line (shell-quoted), identical on every worker."""
  args = ['python3', '-m', 'triplane3d.main', f'--config={config}', f'--workdir={workdir}']
  return shlex.join([*args, *extra])


def pip_install(spec: str) -> str:
  """`pip install --upgrade "spec"` (double quotes, see CD_PACKAGE)."""
  if any(c in spec for c in '"$`\\'):
    raise LaunchError(f'--install={spec!r}: a pip requirement cannot contain " $ ` or \\')
  return f'python3 -m pip install --upgrade "{spec}"'


def wait_lines(command: str) -> list[str]:
  """Bash lines that run `command` in the background and wait for it, signals allowed.

  Bash runs a trap only between commands, so a foreground child would delay it; a trap
  interrupts `wait`, hence the loop until the child has really exited. `$rc` is its status.
  """
  return [
    f'{command} &',
    'child=$!',
    'wait "$child"; rc=$?',
    'while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done',
  ]


def cli(main: Callable[[list[str]], None]) -> None:
  """Runs a launcher's main with clean one-line errors instead of tracebacks."""
  try:
    main(sys.argv[1:])
  except LaunchError as e:
    sys.exit(f'error: {e}')
  except subprocess.CalledProcessError as e:
    sys.exit(f'error: `{shlex.join(e.cmd)}` exited with status {e.returncode}')
