"""Evaluate backbones: `python -m triplane3d.evaluate --config=configs/eval/<suite>.py
--config.backbones=A,B,... --workdir=OUT`.

Backbone specs: random:<variant>, a DINOv2 .pth / .safetensors file, a Hugging Face directory,
hf:<org>/<name>, or a training workdir (DIR or DIR@STEP), each optionally LABEL=SPEC
(evaluate/backbones.py). Suites: configs/eval/ (synthetic, imagenet, shape_bias, inat21,
nyu_depth, all).

Writes OUT/results.json (every number with its protocol), OUT/results.md (a table: rows
backbones, columns metrics, best in bold, difference to the first backbone) and PNG figures.
Features (OUT/features/), rendered synthetic images (OUT/data/) and probe results
(OUT/probes/) are cached: rerunning, or adding a backbone, recomputes only what is missing.

Unknown suites, backbone paths that do not exist and datasets missing from data_dir are
reported (exit status 1) before any work starts.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from triplane3d import run_config

_SYNTHETIC = run_config.config_file('eval', 'synthetic.py')


def main(argv) -> int:
  """The CLI (flags from `_define_flags`); returns the exit status."""
  from triplane3d.evaluate import report, runner

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the progress bars.
  try:
    run = runner.Run(f.config, f.workdir)
  except (ValueError, FileNotFoundError) as err:
    # The checks: suites.UnknownSuiteError, backbones.BackboneSpecError (ValueErrors),
    # datasets.DatasetMissingError (a FileNotFoundError), bad config values.
    print(f'error: {err}', file=sys.stderr)
    return 1
  names = ', '.join(s.name for s in run.suites)
  labels = ', '.join(b.label for b in run.backbones)
  print(f'suites: {names}; backbones: {labels} → {f.workdir}', flush=True)
  summary = run.execute()
  print(report.table(summary))
  log = summary['cache']
  extracted = sum(1 for x in log['features'] if x[2] == 'extracted')
  computed = sum(1 for x in log['probes'] if x[2] == 'computed')
  print(
    f'features: {extracted} image sets extracted, {len(log["features"]) - extracted} cached; '
    f'probes: {computed} computed, {len(log["probes"]) - computed} cached; '
    f'{summary["wall_s"]:.1f} s. Wrote {f.workdir}/results.json, results.md and figures.'
  )
  return 0


def _define_flags() -> None:
  """Only when run as a program, so that importing this module defines no flags."""
  if error := run_config.unknown_override(sys.argv, _SYNTHETIC):
    sys.exit(f'error: {error}'.replace('configs/common.py', 'configs/eval/common.py'))
  config_flags.DEFINE_config_file(
    'config', _SYNTHETIC, 'Evaluation config (configs/eval/*.py).', lock_config=True
  )
  flags.DEFINE_string(
    'workdir', None, 'Output directory (results, figures, caches).', required=True
  )


if __name__ == '__main__':
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
