"""`python -m triplane3d.evaluate` end to end on the synthetic suite (tiny): a random ViT and a
tiny trained run; results.json, results.md and the PNGs agree; a rerun reuses every cached
feature file; the depth probe beats the mean depth."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny import tiny_config
from xla_env import subprocess_env

from triplane3d import train
from triplane3d.configs.eval import synthetic
from triplane3d.evaluate import report, runner
from triplane3d.evaluate.__main__ import _SYNTHETIC

REPO = Path(__file__).resolve().parents[2]


def eval_config(backbone_specs: str):
  """configs/eval/synthetic.py:tiny with the backbones set."""
  config = synthetic.get_config('tiny')
  config.backbones = backbone_specs
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny training run with one checkpoint (stores its config.json)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(str(tmp_path_factory.mktemp('data')), **{'train.num_steps': 1})
  config.train.ckpt_every_steps = 1
  train.run(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def first(trained, tmp_path_factory):
  """The CLI on both backbones, as a user runs it."""
  out = tmp_path_factory.mktemp('eval')
  cmd = [
    sys.executable, '-m', 'triplane3d.evaluate', f'--config={_SYNTHETIC}:tiny',
    f'--config.backbones=random:vit_tiny14,run={trained}', f'--workdir={out}',
  ]  # fmt: skip
  env = subprocess_env()  # One device: quickest.
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'results.json') as f:
    return out, json.load(f), proc.stdout


@pytest.mark.slow
def test_outputs_agree(first):
  out, summary, stdout = first
  labels = [b['label'] for b in summary['backbones']]
  assert labels == ['random-vit_tiny14', 'run']
  assert summary['backbones'][1]['identity']['step'] == 1
  md = (out / 'results.md').read_text()
  rows = {line.split('|')[1].strip(): line for line in md.splitlines() if line.startswith('| ')}
  cols = report.columns(summary)
  assert len(cols) == 5
  for label in labels:
    cells = [c.strip() for c in rows[label].split('|')[2:-1]]
    assert len(cells) == len(cols)
    for (suite, key, _, _, fmt), cell in zip(cols, cells):
      v = summary['results'][label][suite]['metrics'][key]
      shown = re.match(r'\**(-?[\d.]+|n/a)\**', cell).group(1)
      assert shown == report.format_value(v, fmt), (label, key, cell, v)
      if label != labels[0] and shown != 'n/a':  # The difference to the first backbone.
        v0 = summary['results'][labels[0]][suite]['metrics'][key]
        assert cell.endswith(f'({report.format_value(v - v0, fmt, delta=True)})')
  assert report.table(summary) in stdout  # The CLI prints the same table.
  metrics = summary['results']['run']['synthetic']
  assert 0 <= metrics['metrics']['shape_bias'] <= 1
  assert len(metrics['protocol']['probe']['variants']) == 4
  for name in ('synthetic.png', 'synthetic_shape_bias.png'):
    assert f']({name})' in md
    with Image.open(out / name) as img:
      assert img.format == 'PNG' and min(img.size) > 100


def test_depth_probe_beats_the_mean_depth(first):
  _, summary, _ = first
  for label, result in summary['results'].items():
    depth = result['synthetic']['details']['depth']
    assert depth['rmse'] < depth['baselines']['mean_depth']['rmse'], label
    assert depth['rmse'] == result['synthetic']['metrics']['depth_rmse']


def test_rerun_reuses_cached_features(first, trained):
  out, summary, _ = first
  kinds = {x[2] for x in summary['cache']['features']}
  assert kinds == {'extracted'} and len(summary['cache']['features']) == 2 * 9
  cached = sorted((out / 'features').rglob('*.npz'))
  assert len(cached) == 18
  mtimes = [p.stat().st_mtime_ns for p in cached]
  # Without the probe results, the rerun must fit the probes again from cached features.
  for p in (out / 'probes').rglob('*'):
    if p.is_file():
      p.unlink()
  run = runner.Run(eval_config(f'random:vit_tiny14,run={trained}'), str(out))
  second = run.execute()
  assert [e.calls for e in run.extractors.values()] == [0, 0]  # No backbone was even loaded.
  assert {x[2] for x in second['cache']['features']} == {'cached'}
  assert {x[2] for x in second['cache']['probes']} == {'computed'}
  assert [p.stat().st_mtime_ns for p in cached] == mtimes
  for label in summary['results']:  # Same features, same seeds: the same numbers.
    assert second['results'][label]['synthetic']['metrics'] == pytest.approx(
      summary['results'][label]['synthetic']['metrics']
    )
  third = runner.run(eval_config(f'random:vit_tiny14,run={trained}'), str(out))
  assert {x[2] for x in third['cache']['probes']} == {'cached'} and not third['cache']['features']
