"""The Colab notebooks (launch/colab/) execute end to end, headless, on a tiny run.

Each notebook runs in a fresh Jupyter kernel (nbclient) with its parameters replaced by a cell
inserted after the one tagged `parameters` (papermill's convention): tests/tiny.py's config
from the shipped pretrained weights, a few steps, workdirs under tmp_path. The install cell
runs as is and skips the install because the package is importable. The quickstart trains;
your_image then reconstructs its synthetic input with the quickstart's run, and evaluate
compares that run with its starting weights on the synthetic suite (its CI size, 'tiny').
"""

import json
import time
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image, ImageSequence
from xla_env import subprocess_env

from triplane3d.configs import demo

REPO = Path(__file__).resolve().parent.parent
COLAB = REPO / 'launch' / 'colab'
NOTEBOOKS = ('quickstart.ipynb', 'your_image.ipynb', 'evaluate.ipynb')


def _execute(name: str, params: dict, cwd: Path) -> nbformat.NotebookNode:
  """Runs launch/colab/NAME with `params` injected; raises CellExecutionError on any error."""
  nb = nbformat.read(COLAB / name, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name}: expected one cell tagged parameters, found {tagged}'
  source = '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  injected = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  nb.cells.insert(tagged[0] + 1, injected)
  # One CPU device: conftest's 8 fake devices only slow a batch-of-8 run down.
  env = subprocess_env(JAX_PLATFORMS='cpu')
  client = nbclient.NotebookClient(
    nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(cwd)}}
  )
  client.execute(env=env)
  return nb


def _outputs(nb, mime: str) -> list:
  return [
    o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if mime in o.get('data', {})
  ]


def _text(nb) -> str:
  parts = []
  for c in nb.cells:
    for o in c.get('outputs', []):
      parts.append(o.get('text', '') or o.get('data', {}).get('text/plain', ''))
  return '\n'.join(parts)


def _assert_picture(path: Path, min_side: int = 64) -> np.ndarray:
  assert path.is_file(), f'{path.name} missing'
  with Image.open(path) as im:
    pixels = np.asarray(im.convert('RGB'))
  assert min(pixels.shape[:2]) >= min_side and pixels.std() > 0, (path.name, pixels.shape)
  return pixels


def _pca_tiles(panel: np.ndarray, count: int) -> list[np.ndarray]:
  """The `count` tiles right of the input in a `notebook.panel` row (below its caption)."""
  side, gap = panel.shape[0] - 18, 6
  return [panel[18:, i * (side + gap) : i * (side + gap) + side] for i in range(1, count + 1)]


def test_stored_notebooks_have_no_outputs_and_one_parameters_cell():
  for name in NOTEBOOKS:
    nb = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code), name
    tags = [c for c in code if 'parameters' in c.metadata.get('tags', [])]
    assert len(tags) == 1, name
    assert 'REPO = ' in code[0].source and 'find_spec' in code[0].source, name  # Install cell.


@pytest.mark.slow
def test_notebooks_execute_end_to_end(tmp_path):
  start = time.monotonic()
  workdir = tmp_path / 'run'
  quick = _execute(
    'quickstart.ipynb',
    {
      'CONFIG': f'{REPO}/tests/tiny.py:{tmp_path / "data"}',
      'STEPS': 3,
      'WORKDIR': str(workdir),
      # The shipped weights, so that 'before' exists; 56 px gives a 4×4 patch grid.
      'OVERRIDES': {'model.init_from': demo.PRETRAINED, 'model.img_size': 56},
      'SCENES': 2,
    },
    tmp_path,
  )
  text = _text(quick)
  assert 'triplane3d is already installed.' in text
  assert f'{workdir}: step 3' in text, text[-2000:]
  stored = json.loads((workdir / 'config.json').read_text())
  assert stored['train']['num_steps'] == 3 and stored['model']['img_size'] == 56
  out = workdir / 'notebook'
  for ext in ('rgb.png', 'depth.npy', 'depth.png', 'views.gif'):
    assert (out / f'heldout_0.{ext}').is_file(), f'heldout_0.{ext} missing'
  _assert_picture(out / 'heldout_0.panel.png')
  with Image.open(out / 'heldout_0.views.gif') as im:
    assert im.n_frames == len(list(ImageSequence.Iterator(im))) >= 8
  for i in range(2):
    row = _assert_picture(out / f'pca_{i}.png')
    before, after, change = _pca_tiles(row, 3)  # The last: how far the features turned.
    assert row.shape[1] == 4 * change.shape[0] + 3 * 6  # input | before | after | change.
    for tile in (before, after):  # Several colours: the features vary over the patches.
      assert len(np.unique(tile.reshape(-1, 3), axis=0)) >= 4
    assert change.max() == 255  # Scaled to its largest value: the student moved.
  # Shown in the notebook: the reconstruction row and 2 PCA rows (PNG), the orbit (GIF).
  assert len(_outputs(quick, 'image/png')) == 3
  assert len(_outputs(quick, 'image/gif')) == 1

  mine = tmp_path / 'mine'
  yours = _execute(
    'your_image.ipynb', {'SIZE': 56, 'WORKDIR': str(workdir), 'OUT': str(mine)}, tmp_path
  )
  assert (mine / 'scene.png').is_file()  # No Colab upload here: a synthetic scene.
  (pca,) = _pca_tiles(_assert_picture(mine / 'pca.png'), 1)
  assert len(np.unique(pca.reshape(-1, 3), axis=0)) >= 4
  for ext in ('rgb.png', 'depth.npy', 'views.gif'):
    assert (mine / f'scene.{ext}').is_file(), f'scene.{ext} missing'
  _assert_picture(mine / 'scene.panel.png')
  assert len(_outputs(yours, 'image/png')) == 2
  assert len(_outputs(yours, 'image/gif')) == 1

  results = tmp_path / 'eval'
  evaluated = _execute(
    'evaluate.ipynb',
    {'WORKDIR': str(workdir), 'CONFIG': 'eval.synthetic:tiny', 'OUT': str(results)},
    tmp_path,
  )
  summary = json.loads((results / 'results.json').read_text())
  assert [b['label'] for b in summary['backbones']] == ['before', 'after']
  assert summary['backbones'][0]['spec'] == f'before={demo.PRETRAINED}'  # Its init_from.
  assert (results / 'results.md').is_file()
  (table,) = _outputs(evaluated, 'text/markdown')
  assert (
    '| before' in table['data']['text/markdown'] and '| after' in table['data']['text/markdown']
  )
  shown = _outputs(evaluated, 'image/png')
  assert shown and len(shown) == len(list(results.glob('*.png')))
  print(f'three notebooks: {time.monotonic() - start:.1f} s')
