"""Tests for triplane3d/run_config.py and the config-related refusals of the trainer: the
stored config and what may change on resume, unknown --config.* fields on the command line,
and a mistyped model.init_from path.

The resumes of real runs (refused, allowed, another worker count) are in test_train.py.
"""

import os
import subprocess
import sys

import pytest
from tiny import tiny_config
from xla_env import subprocess_env

from triplane3d import run_config, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  env = subprocess_env()
  return subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120, cwd=REPO
  )


@pytest.mark.parametrize(
  'override, want',
  [
    ('--config.optim.lrr=1', "section 'optim' has no field 'lrr'. Did you mean optim.lr?"),
    ('--config.lr=1', 'Did you mean optim.lr?'),  # The same name in another section.
    (
      '--config.train.foo=1',
      "Fields of section 'train': accum_steps, batch_size, ckpt_every_steps",
    ),
  ],
)
def test_unknown_override_names_the_field_and_the_closest(tmp_path, override, want):
  # Was `AttributeError: "'foo'"` and a 30-line traceback.
  done = _cli('-m', 'triplane3d.main', f'--workdir={tmp_path}', override)
  assert done.returncode != 0
  (line,) = done.stderr.strip().splitlines()  # One line, no traceback.
  assert line.startswith(f'error: unknown config field {override.split("=")[0]}: ')
  assert want in done.stderr and 'Traceback' not in done.stderr
  assert not os.listdir(tmp_path)  # Nothing started.


def test_unknown_override_is_checked_against_the_given_config_file(tmp_path):
  spec = f'--config={REPO}/tests/tiny.py:{tmp_path}'
  assert run_config.unknown_override(['x', spec, '--config.render.chunk=8'], 'none') is None
  error = run_config.unknown_override(['x', spec, '--config.render.chunks=8'], 'none')
  assert 'Did you mean render.chunk, render.gpu_chunk?' in error
  done = _cli('-m', 'triplane3d.reconstruct', spec, '--config.render.chunks=8',
              f'--workdir={tmp_path}', f'--images={tmp_path}', f'--out={tmp_path}')  # fmt: skip
  assert done.returncode != 0 and 'render.chunks' in done.stderr and 'Traceback' not in done.stderr


def _stored(data_dir, **overrides):
  config = tiny_config(data_dir, **overrides)
  config.workdir = '/somewhere'
  return config


def test_check_resume_refuses_run_changing_fields_and_allows_the_rest(tmp_path):
  workdir = str(tmp_path)
  # Stored with render.sort='rank', the default before 'auto' (a run of an older version).
  run_config.write(workdir, _stored('d', **{'render.sort': 'rank'}))
  allowed = _stored('elsewhere', **{
    'train.num_steps': 100, 'train.log_every_steps': 7, 'mesh.fsdp': 2, 'render.chunk': 8,
  })  # fmt: skip
  assert allowed.render.sort == 'auto'
  allowed.workdir = workdir
  run_config.check_resume(workdir, allowed, resuming=True)
  assert run_config.read(workdir).train.num_steps == 100  # The new config is stored.

  changed = _stored('d', **{'optim.lr': 0.5, 'model.dtype': 'bfloat16', 'seed': 3})
  with pytest.raises(run_config.ConfigChangedError) as e:
    run_config.check_resume(workdir, changed, resuming=True)
  msg = str(e.value)
  assert '(3 fields, stored -> new)' in msg
  assert "  model.dtype: 'float32' -> 'bfloat16'\n  optim.lr: 0.001 -> 0.5\n  seed: 0 -> 3" in msg
  assert '--allow_config_change' in msg and 'fresh --workdir' in msg
  assert run_config.read(workdir).optim.lr == 0.001  # Untouched.
  # Without a checkpoint there is nothing to resume: a new config just replaces the old.
  run_config.check_resume(workdir, changed, resuming=False)
  assert run_config.read(workdir).optim.lr == 0.5


def test_a_longer_run_changes_a_cosine_schedule(tmp_path):
  workdir = str(tmp_path)
  run_config.write(workdir, _stored('d', **{'optim.schedule': 'cosine'}))
  longer = _stored('d', **{'optim.schedule': 'cosine', 'train.num_steps': 8})
  with pytest.raises(
    run_config.ConfigChangedError,
    match=r'train.num_steps: 4 -> 8 \(the cosine learning-rate schedule depends on it\)',
  ):
    run_config.check_resume(workdir, longer, resuming=True)
  run_config.check_resume(workdir, longer, resuming=True, allow_change=True)
  assert run_config.read(workdir).train.num_steps == 8
  (kept,) = tmp_path.glob('config.replaced_*.json')  # The replaced config is not lost.
  assert '"num_steps": 4' in kept.read_text()


def test_stored_config_reads_back_equal(tmp_path):
  config = _stored('d', **{'optim.lr_mults': (('backbone/.*', 0.5), ('.*', 1.0))})
  run_config.write(str(tmp_path), config)
  back = run_config.read(str(tmp_path))
  assert run_config.differences(back, config) == []
  assert back.optim.lr_mults == (('backbone/.*', 0.5), ('.*', 1.0))  # Tuples, not lists.
  assert 'lr_mults' in (tmp_path / 'config.txt').read_text()


def test_mistyped_init_from_path_is_file_not_found(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = tiny_config(str(tmp_path / 'data'), **{'model.init_from': 'weights/dinov2.pth'})
  # Was "could not download 'weights/dinov2.pth' from the Hugging Face hub".
  with pytest.raises(FileNotFoundError) as e:
    train.run(config, str(tmp_path / 'w'))
  assert f'file not found: {tmp_path}/weights/dinov2.pth' in str(e.value)
  assert 'hub' in str(e.value)  # The fix for those who meant a hub name.
  (tmp_path / 'weights').mkdir()
  with pytest.raises(FileNotFoundError, match='file not found'):
    train._check_init_from('weights/dinov2_vitb14')  # A local folder: a path.
  for name in ('facebook/dinov2-base', ''):  # Hub names go on to the download.
    train._check_init_from(name)


def test_a_field_added_later_is_no_change_at_its_default(tmp_path):
  # A run stored before render.plane_space existed resumes with the field at its default
  # (the old behaviour); a non-default value for it is a change.
  old = _stored('d')
  del old.render['plane_space']
  new = _stored('d')
  assert run_config.differences(old, new) == []
  new.render.plane_space = 'frustum'
  assert run_config.differences(old, new) == [('render.plane_space', '<absent>', 'frustum')]


def test_reading_an_older_run_fills_fields_added_later(tmp_path):
  old = _stored('d')
  del old.render['plane_space']
  (tmp_path / 'config.json').write_text(run_config.to_json(old))
  back = run_config.read(str(tmp_path))
  assert back.render.plane_space == 'box'  # The default: the behaviour before the field.
  assert back.train.num_steps == old.train.num_steps  # Stored values win.
