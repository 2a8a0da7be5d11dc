"""Backbone specs for evaluation: what `--config.backbones=A,B,...` names, checked before work.

A spec is one of

  random:VARIANT        a randomly initialised `vit.create(VARIANT)` (seed `config.seed`)
  FILE.pth|.safetensors  DINOv2 weights, official or exported (`convert.load.load_dinov2`)
  HF_DIR                a Hugging Face Dinov2Model directory (config.json + *.safetensors)
  hf:ORG/NAME           a Hugging Face hub name, downloaded when the network allows
  RUN_DIR[@STEP]        a training workdir: the student backbone of its latest (or STEP)
                        checkpoint, restored with `checkpoint.restore_params`

optionally prefixed by `LABEL=` to name it in reports (default: the variant for random
backbones, the file stem, the directory name; `@STEP` is kept in the label).

`parse` checks everything that can be checked without loading weights (the path exists, a
workdir has that checkpoint step, the variant is known) so a typo fails before any feature
is extracted; `Backbone.load` reads the parameters, one backbone at a time.

`Backbone.identity` is what the feature cache is keyed by: the spec's resolved meaning
(absolute path, checkpoint step, file sizes and modification times), not its label, so a
renamed label reuses features and a retrained workdir or replaced file recomputes them.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from triplane3d.models import vit

_LABEL_RE = re.compile(r'^([A-Za-z0-9_.+-]+)=(.+)$')
_WEIGHT_EXTENSIONS = ('.pth', '.pt', '.bin', '.safetensors')


class BackboneSpecError(ValueError):
  """A backbone spec that names nothing loadable (the message says what to pass instead)."""


def _usage() -> str:
  return (
    'pass an existing .pth/.safetensors file, a Hugging Face model directory, a training '
    'workdir (DIR or DIR@STEP), random:<variant> (variants: '
    + ', '.join(vit.VARIANTS)
    + ') or hf:<org>/<name>, optionally as LABEL=SPEC.'
  )


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A checked backbone spec (see the module docstring). `load()` reads its weights."""

  label: str
  spec: str
  kind: str  # 'random' | 'file' | 'hf_dir' | 'hub' | 'workdir'
  identity: dict
  path: str = ''
  step: int | None = None
  variant: str = ''  # Known up front for random backbones and workdirs with a config.
  train_config: Any = None  # The run's config (workdirs), to check the restored tree.

  def load(self, seed: int = 0) -> tuple[str, dict]:
    """(variant, backbone params as a nested dict of float32 numpy arrays)."""
    if self.kind == 'random':
      model = vit.create(self.variant)
      params = vit.init_params(model, jax.random.key(seed), img_size=model.patch_size)
    elif self.kind == 'workdir':
      from triplane3d import checkpoint

      _, params = checkpoint.restore_params(self.path, self.step, self.train_config)
      params = params['backbone']
    else:
      from triplane3d.convert import load

      params = load.load_dinov2(self.path)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return self.variant or variant_of(params), params


def variant_of(params: dict) -> str:
  """The `vit.VARIANTS` name of backbone params, from their shapes."""
  from triplane3d.convert import keys, load

  return load.infer_variant(keys.flax_to_official(params))


def create_model(variant: str, dtype: str = 'float32') -> vit.DinoViT:
  """The ViT that evaluates a backbone (no remat, deterministic, in `dtype`)."""
  return vit.create(variant, dtype=jnp.dtype(dtype))


def _mtime_identity(paths: list[str]) -> list:
  return [(os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]


def load_train_config(path: str):
  """`get_config()` of a training config file (for workdirs that store no config.json)."""
  file, *arg = path.split(':', 1)
  if not os.path.isfile(file):
    raise BackboneSpecError(
      f'--config.train_config={path!r}: no such file; pass the training config file the '
      'runs were trained with, e.g. configs/demo.py.'
    )
  spec = importlib.util.spec_from_file_location('_eval_train_config', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def _workdir(label: str, spec: str, path: str, step: int | None, train_config: str) -> Backbone:
  from triplane3d import checkpoint

  steps = checkpoint.finished_steps(path)
  if not steps:
    raise BackboneSpecError(
      f'backbone {spec!r}: {path} has no finished checkpoint yet; train it longer or pass '
      'another backbone.'
    )
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise BackboneSpecError(
      f'backbone {spec!r}: no checkpoint for step {step} in {path}; its steps are {steps}. '
      f'Pass {path}@STEP with one of them, or {path} for the latest.'
    )
  config = _run_config(path)
  if config is None and train_config:
    config = load_train_config(train_config)
  variant = str(config.model.variant) if config is not None else ''
  ckpt = os.path.join(os.path.abspath(path), checkpoint.CHECKPOINTS, str(step))
  identity = {
    'kind': 'workdir',
    'path': os.path.abspath(path),
    'step': step,
    'mtime_ns': os.stat(ckpt).st_mtime_ns,
  }
  return Backbone(label, spec, 'workdir', identity, path, step, variant, config)


def _run_config(path: str):
  """The config a run stored (config.json), or None for runs that store none."""
  try:
    from triplane3d import run_config
  except ImportError:  # Older trees: no stored configs.
    return None
  return run_config.read(path)


def _one(spec: str, train_config: str, seed: int) -> Backbone:
  m = _LABEL_RE.match(spec)
  label, target = (m.group(1), m.group(2)) if m and '/' not in m.group(1) else ('', spec)
  if target.startswith('random:'):
    variant = target.split(':', 1)[1]
    if variant not in vit.VARIANTS:
      raise BackboneSpecError(f'backbone {spec!r}: unknown variant {variant!r}; ' + _usage())
    identity = {'kind': 'random', 'variant': variant, 'seed': int(seed)}
    return Backbone(label or f'random-{variant}', spec, 'random', identity, variant=variant)
  if target.startswith('hf:'):
    name = target[3:]
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', name):
      raise BackboneSpecError(f'backbone {spec!r}: {name!r} is not a hub name; ' + _usage())
    identity = {'kind': 'hub', 'name': name}
    return Backbone(label or name.split('/')[-1], spec, 'hub', identity, path=name)
  path, step = target, None
  at = re.fullmatch(r'(.+)@(\d+)', target)
  if at and not os.path.exists(target):
    path, step = at.group(1), int(at.group(2))
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise BackboneSpecError(f'backbone {spec!r}: no such file or directory {path!r}; ' + _usage())
  name = os.path.basename(os.path.normpath(path))
  if os.path.isdir(path):
    from triplane3d import checkpoint

    if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINTS)):
      default = name if step is None else f'{name}@{step}'
      return _workdir(label or default, spec, path, step, train_config)
    if step is not None:
      raise BackboneSpecError(f'backbone {spec!r}: @STEP needs a training workdir; ' + _usage())
    weights = sorted(glob.glob(os.path.join(path, '*.safetensors')))
    if not weights:
      raise BackboneSpecError(
        f'backbone {spec!r}: {path} is neither a training workdir (no checkpoints/ inside) '
        'nor a Hugging Face model directory (no .safetensors inside); ' + _usage()
      )
    identity = {'kind': 'hf_dir', 'path': os.path.abspath(path), 'files': _mtime_identity(weights)}
    return Backbone(label or name, spec, 'hf_dir', identity, path)
  if step is not None or not path.endswith(_WEIGHT_EXTENSIONS):
    raise BackboneSpecError(
      f'backbone {spec!r}: {path} is not a weights file ({", ".join(_WEIGHT_EXTENSIONS)}); '
      + _usage()
    )
  identity = {'kind': 'file', 'path': os.path.abspath(path), 'files': _mtime_identity([path])}
  return Backbone(label or os.path.splitext(name)[0], spec, 'file', identity, path)


def parse(specs: str, *, train_config: str = '', seed: int = 0) -> list[Backbone]:
  """Checks a comma-separated list of specs (module docstring); raises BackboneSpecError."""
  items = [s.strip() for s in str(specs).split(',') if s.strip()]
  if not items:
    raise BackboneSpecError(
      'no backbones given: pass --config.backbones=A,B,... (e.g. random:vit_tiny14,/tmp/run); '
      + _usage()
    )
  backbones = [_one(s, train_config, seed) for s in items]
  labels = [b.label for b in backbones]
  dupes = sorted({x for x in labels if labels.count(x) > 1})
  if dupes:
    raise BackboneSpecError(
      f'backbones share the labels {dupes}; name them apart as LABEL=SPEC, e.g. '
      f'--config.backbones=a={items[0]},b={items[-1]}.'
    )
  return backbones
