"""Bad input to `python -m triplane3d.evaluate` fails at once, naming the problem and the fix:
unknown suites, backbone specs naming nothing, datasets missing from data_dir."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from xla_env import subprocess_env

from triplane3d import checkpoint
from triplane3d.configs.eval import synthetic
from triplane3d.evaluate import backbones, datasets, runner, suites

REPO = Path(__file__).resolve().parents[2]


def _config(**values):
  c = synthetic.get_config('tiny')
  c.backbones = 'random:vit_tiny14'
  for k, v in values.items():
    setattr(c, k, v)
  return c


def _refused(tmp_path, error, *fragments, **values):
  """Run(...) raises `error` with every fragment in its message, quickly, writing nothing."""
  start = time.perf_counter()
  with pytest.raises(error) as info:
    runner.Run(_config(**values), str(tmp_path / 'out'))
  assert time.perf_counter() - start < 5  # Before any rendering or feature extraction.
  assert not (tmp_path / 'out').exists()
  for fragment in fragments:
    assert fragment in str(info.value), (fragment, str(info.value))
  return str(info.value)


def test_unknown_suite(tmp_path):
  _refused(tmp_path, suites.UnknownSuiteError, "'synthetc'", 'synthetic', 'all', suites='synthetc')
  _refused(tmp_path, suites.UnknownSuiteError, 'imagenet,shape_bias', suites='shape_bias')


def test_backbone_that_does_not_exist(tmp_path):
  missing = str(tmp_path / 'no_such_run')
  _refused(tmp_path, backbones.BackboneSpecError, missing, 'random:<variant>', 'DIR@STEP',
           backbones=f'random:vit_tiny14,{missing}')  # fmt: skip
  _refused(tmp_path, backbones.BackboneSpecError, "'vit_huge'", 'vitb14',
           backbones='random:vit_huge')  # fmt: skip
  (tmp_path / 'notes.txt').write_text('x')
  _refused(tmp_path, backbones.BackboneSpecError, 'not a weights file', '.safetensors',
           backbones=str(tmp_path / 'notes.txt'))  # fmt: skip
  (tmp_path / 'empty_dir').mkdir()
  _refused(tmp_path, backbones.BackboneSpecError, 'neither a training workdir',
           backbones=str(tmp_path / 'empty_dir'))  # fmt: skip
  _refused(tmp_path, backbones.BackboneSpecError, 'LABEL=SPEC',
           backbones='random:vit_tiny14,random:vit_tiny14')  # fmt: skip
  _refused(tmp_path, backbones.BackboneSpecError, '--config.backbones=', backbones=' , ')


def test_workdir_without_that_step(tmp_path):
  run = tmp_path / 'run'
  (run / checkpoint.CHECKPOINTS).mkdir(parents=True)
  _refused(tmp_path, backbones.BackboneSpecError, 'no finished checkpoint', backbones=str(run))
  (run / checkpoint.CHECKPOINTS / '7').mkdir()  # What orbax lists as a finished step.
  message = _refused(tmp_path, backbones.BackboneSpecError, 'step 3', '[7]',
                     backbones=f'{run}@3')  # fmt: skip
  assert f'{run}@STEP' in message
  # A run that stores no config: the given training config names its architecture.
  b = backbones.parse(f'{run}@7', train_config=f'{REPO}/configs/demo.py')[0]
  assert (b.label, b.step, b.variant, b.identity['step']) == ('run@7', 7, 'vit_tiny14', 7)


def test_dataset_missing_from_data_dir(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  _refused(tmp_path, datasets.DatasetMissingError, "'imagenet2012'", data_dir, 'tfds build',
           'array_record', suites='imagenet', data_dir=data_dir)  # fmt: skip
  _refused(tmp_path, datasets.DatasetMissingError, "'nyu_depth_v2'", suites='nyu_depth',
           data_dir=data_dir)  # fmt: skip
  _refused(tmp_path, datasets.DatasetMissingError, 'texture-vs-shape', 'import_folder',
           suites='all', data_dir=data_dir, backbones='random:vit_tiny14')  # fmt: skip


def test_cli_exit_status_and_message(tmp_path):
  cmd = [
    sys.executable, '-m', 'triplane3d.evaluate', f'--config={REPO}/configs/eval/synthetic.py:tiny',
    f'--config.backbones={tmp_path}/missing.pth', f'--workdir={tmp_path}/out',
  ]  # fmt: skip
  env = subprocess_env()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.startswith('error: backbone') and 'missing.pth' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = subprocess.run([*cmd[:3], '--config.suite=synthetic', f'--workdir={tmp_path}/out'],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
  assert proc.returncode != 0 and 'suites' in proc.stderr  # The closest valid field named.
