"""The config a run was trained with: stored in its workdir, checked on resume, and the
`--config.a.b=v` overrides checked before any flag is parsed.

`train.run` writes the resolved config as `<workdir>/config.json` (read back by `read`, e.g.
by `reconstruct` when no --config is given) and `config.txt` (the same, readable). Resuming
a run compares the stored config with the new one (`check_resume`): fields that change what
is computed are refused unless the caller allows it, each listed as `field: stored -> new`.
File names come from `checkpoint` (the one owner of a run directory's layout).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections as mlc
from absl import logging
from etils import epath

# Fields that may differ between a run and its resume because they do not change what is
# computed: where things live, how often we look, how the work is laid out on devices, and
# how far to go. Everything else (optimiser, losses, model, decoder, render, camera, depth,
# data, seed, batch size, dtypes) changes the run and is refused without the override.
RESUMABLE = frozenset({
  'workdir',  # The run may have moved.
  'data.data_dir',  # Where the same data lives.
  'data.prefetch',  # Buffering only; the batch order does not depend on it.
  'data.device_prefetch',  # Likewise; checkpoints keep the consumed position.
  'train.log_every_steps',
  'train.image_every_steps',
  'train.ckpt_every_steps',
  'train.keep_ckpts',
  'train.preempt_sync_every_steps',
  'eval.num_heldout',  # Evaluation only.
  'mesh.data',  # The device layout: the same maths up to float reduction order.
  'mesh.fsdp',
  'model.remat',  # Memory for compute: the same numbers.
  'model.remat_policy',
  'model.scan_blocks',  # The same blocks and parameters, compiled as one loop.
  'decoder.remat',
  'render.chunk',
  'render.gpu_chunk',
  'render.taps',  # How the lookup's 12 taps are summed: float summation order only.
  'render.lookup',  # The same lookup and point MLP in one kernel: summation order only.
  # The same merge by depth ('rank' or a sort kernel): runs saved with the old default 'rank'
  # resume under 'auto'.
  'render.sort',
  # Micro-batches of the same global batch: each image draws the same rays whatever k (the
  # rays are keyed per image), so only the float summation order changes.
  'train.accum_steps',
})  # fmt: skip
# The run's length: free while the learning-rate schedule does not depend on it (a cosine
# schedule decays over the total number of steps, so a longer run has other learning rates).
LENGTH = frozenset({'train.num_steps', 'train.num_epochs'})
_ABSENT = '<absent>'


class ConfigChangedError(ValueError):
  """Resuming a run with a config that changes what it computes."""


def _paths(workdir: str) -> tuple[epath.Path, epath.Path]:
  from triplane3d import checkpoint  # Lazily: the CLI's override check must not load jax.

  return epath.Path(workdir) / checkpoint.CONFIG_JSON, epath.Path(workdir) / checkpoint.CONFIG_TEXT


def _plain(value: Any) -> Any:
  """JSON's view of a value with tuples back: what a stored config reads back as."""
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def flat(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """A nested mapping as {'a.b.c': leaf}."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    out.update(flat(v, path + '.') if isinstance(v, Mapping) else {path: v})
  return out


def to_json(config: mlc.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n'


def write(workdir: str, config: mlc.ConfigDict) -> None:
  """Writes `config.json` and `config.txt` into `workdir`, each atomically (temp + rename)."""
  for path, text in zip(_paths(workdir), (to_json(config), str(config)), strict=True):
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)


def _merged(base: Mapping, stored: Mapping) -> dict:
  out = dict(base)
  for k, v in stored.items():
    both = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
    out[k] = _merged(out[k], v) if both else v
  return out


def read(workdir: str) -> mlc.ConfigDict | None:
  """The config stored in `workdir` (locked, tuples as tuples), or None if there is none.

  Fields added to the project after the run stored its config get their defaults from
  `configs/common.py` (a new field defaults to the behaviour from before it existed), so tools
  such as `reconstruct` can build an older run's model.
  """
  from triplane3d.configs import common

  path = _paths(workdir)[0]
  if not path.exists():
    return None
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); repair it or delete it.') from e
  config = mlc.ConfigDict(_plain(_merged(common.get_base_config().to_dict(), stored)))
  config.lock()
  return config


def differences(stored: mlc.ConfigDict, new: mlc.ConfigDict) -> list[tuple[str, Any, Any]]:
  """(field, stored value, new value) for every field that differs, sorted by field.

  A field the stored config lacks (it was added to the project after that run started) is
  no difference when the new value is the field's default in `configs/common.py`: a new field
  defaults to the behaviour the project had before it existed.
  """
  from triplane3d.configs import common

  a = flat(_plain(stored.to_dict()))
  b = flat(_plain(json.loads(to_json(new))))  # Through JSON, as the stored one went.
  defaults = flat(_plain(json.loads(to_json(common.get_base_config()))))
  return [
    (k, a.get(k, _ABSENT), b.get(k, _ABSENT))
    for k in sorted(set(a) | set(b))
    if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    and not (k not in a and k in defaults and b.get(k) == defaults[k])
  ]


def check_resume(
  workdir: str,
  config: mlc.ConfigDict,
  *,
  resuming: bool,
  allow_change: bool = False,
  write_files: bool = True,
) -> None:
  """Refuses to resume with a config that changes the run; then stores `config`.

  Args:
    workdir: the run directory.
    config: the resolved config this run will use.
    resuming: whether the workdir has a checkpoint to resume (without one nothing is
      compared: a run that died before its first checkpoint restarts from scratch).
    allow_change: continue despite run-changing differences (they are logged, and the
      replaced config is kept as `config.replaced_<time>.json`).
    write_files: whether this process writes (process 0 only, on a shared workdir).

  Raises:
    ConfigChangedError: listing each refused field as `field: stored -> new`.
  """
  json_path = _paths(workdir)[0]
  stored = read(workdir) if resuming else None
  if resuming and stored is None:
    logging.warning('%s has checkpoints but no stored config (an older run): the config '
                    'cannot be compared; storing this one.', workdir)  # fmt: skip
  diffs = differences(stored, config) if stored is not None else []
  constant_lr = stored is None or (
    stored.get('optim', {}).get('schedule') == config.optim.schedule == 'constant'
  )
  free = RESUMABLE | (LENGTH if constant_lr else frozenset())
  refused = [d for d in diffs if d[0] not in free]
  lines = '\n'.join(
    f'  {k}: {old!r} -> {new!r}'
    + (' (the cosine learning-rate schedule depends on it)' if k in LENGTH else '')
    for k, old, new in refused
  )
  if refused and not allow_change:
    raise ConfigChangedError(
      f'{workdir} holds a run trained with another config, and resuming it with this one '
      f'would change the run ({len(refused)} fields, stored -> new):\n{lines}\n'
      f'The stored config is {json_path} (readable: config.txt). Resume with the stored '
      'values, train in a fresh --workdir, or pass --allow_config_change to '
      'triplane3d.main (train.run(..., allow_config_change=True)) to continue with the new '
      'values anyway. Free to change on resume: '
      + ', '.join(sorted(RESUMABLE | LENGTH))
      + ' (the last two with a constant learning-rate schedule only).'
    )
  if refused:
    logging.warning('Resuming %s with a changed config (--allow_config_change):\n%s',
                    workdir, lines)  # fmt: skip
  elif diffs:
    logging.info('Resuming with changed fields that leave the run as it was: %s',
                 ', '.join(f'{k}: {old!r} -> {new!r}' for k, old, new in diffs))  # fmt: skip
  if not write_files or (stored is not None and not diffs):
    return
  if refused:
    stamp = time.strftime('%Y%m%d-%H%M%S')
    json_path.replace(json_path.with_name(f'config.replaced_{stamp}.json'))
  write(workdir, config)


def apply_overrides(config: mlc.ConfigDict, values: Mapping[str, Any]) -> mlc.ConfigDict:
  """A copy of `config` with `{'a.b': v}` set (e.g. ml_collections' parsed --config.a.b=v)."""
  config = config.copy_and_resolve_references()
  for path, value in values.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# --- The command line: unknown --config.* fields. ---


def _config_spec(argv: Sequence[str], name: str, default: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _load(spec: str) -> Any:
  """`get_config(arg)` of a config file given as 'path[:arg]', as ml_collections loads it."""
  path, *arg = spec.split(':', 1)
  module_spec = importlib.util.spec_from_file_location('_checked_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*arg)


def unknown_field(config: mlc.ConfigDict, path: str) -> str | None:
  """Why `path` names no field of `config`, with the closest valid names; None if it does."""
  node, walked = config, []
  for part in path.split('.'):
    if '[' in part:  # An index into a sequence: ml_collections checks it.
      return None
    if not isinstance(node, mlc.ConfigDict):
      return f'{".".join(walked)} is a value, not a section: it has no field {part!r}.'
    if part not in node:
      section = '.'.join(walked)
      prefix = f'{section}.' if section else ''
      close = [prefix + k for k in difflib.get_close_matches(part, list(node.keys()), n=3)]
      # The same name in another section (e.g. --config.lr for optim.lr).
      leaves: dict[str, list[str]] = {}
      for p in sorted(flat(config.to_dict())):
        leaves.setdefault(p.rsplit('.', 1)[-1], []).append(p)
      for name in difflib.get_close_matches(part, list(leaves), n=3, cutoff=0.8):
        close += [p for p in leaves[name] if p not in close]
      close = close[:5]
      where = f'section {section!r}' if section else 'the config'
      hint = (
        f'Did you mean {", ".join(close)}?'
        if close
        else f'Fields of {where}: {", ".join(sorted(node.keys()))}.'
      )
      return f'{where} has no field {part!r}. {hint}'
    node = node[part]
    walked.append(part)
  return None


def config_file(*parts: str) -> str:
  """The path of a config file installed with the package, e.g. `config_file('demo.py')` or
  `config_file('eval', 'synthetic.py')` (configs/ is the package `triplane3d.configs`)."""
  import triplane3d.configs

  return os.path.join(os.path.dirname(triplane3d.configs.__file__), *parts)


def define_config_flag(default_config: str, help_text: str) -> Any:
  """absl's `--config` flag (a locked config file, `default_config` unless given), defined after
  refusing unknown `--config.*` overrides in `sys.argv` (`unknown_override`): exits with
  'error: ...' naming the field. For the command-line programs; returns the flag holder."""
  from ml_collections import config_flags

  if error := unknown_override(sys.argv, default_config):
    sys.exit(f'error: {error}')
  return config_flags.DEFINE_config_file('config', default_config, help_text, lock_config=True)


def unknown_override(argv: Sequence[str], default_config: str, name: str = 'config') -> str | None:
  """The error for the first `--<name>.<path>=v` in `argv` naming no field, else None.

  Checked against the config file `--<name>` names (or `default_config`) before absl
  parses the flags: ml_collections' own report is a bare `AttributeError: "'foo'"`.
  """
  pattern = re.compile(rf'^-{{1,2}}(no)?{re.escape(name)}\.([^=]+)')
  overrides = [m.group(2) for a in argv[1:] if (m := pattern.match(a))]
  if not overrides:
    return None
  try:
    config = _load(_config_spec(argv, name, default_config))
  except Exception:  # A broken config file: ml_collections reports it.
    return None
  if not isinstance(config, mlc.ConfigDict):
    return None
  for path in overrides:
    problem = unknown_field(config, path)
    if problem:
      return f'unknown config field --{name}.{path}: {problem} (All fields: configs/common.py.)'
  return None
