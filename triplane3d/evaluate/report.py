"""results.md from results.json's dict: one table (rows backbones, columns every suite's headline
metrics), the best per column in bold, each cell's difference to the first backbone, then the
baselines and settings a reader needs to judge the numbers, and the figures (figures.py).

Cells: percentages as 100·value with one decimal ('percent' columns), others with four
decimals; the difference in parentheses in the same unit; 'n/a' where a value is undefined
(e.g. a shape bias with no shape or texture decision).
"""

from __future__ import annotations

import math
import os

from triplane3d.evaluate import figures


def format_value(value, fmt: str, delta: bool = False) -> str:
  """The text of one number: 'percent' → 100·v, 1 decimal; 'float' → 4 decimals."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return 'n/a'
  v = 100.0 * value if fmt == 'percent' else value
  spec = ('+' if delta else '') + ('.1f' if fmt == 'percent' else '.4f')
  return format(v, spec)


def columns(summary: dict) -> list[tuple[str, str, str, bool, str]]:
  """(suite, key, title, higher is better, format) of every table column, in suite order."""
  return [(s['name'], *c) for s in summary['suites'] for c in s['columns']]


def value(summary: dict, label: str, suite: str, key: str):
  return summary['results'][label][suite]['metrics'].get(key)


def _shown(v, fmt: str) -> float | None:
  """The number a cell shows (rounded as printed), None for 'n/a'."""
  text = format_value(v, fmt)
  return None if text == 'n/a' else float(text)


def table(summary: dict) -> str:
  """The Markdown table (module docstring)."""
  cols = columns(summary)
  labels = [b['label'] for b in summary['backbones']]
  lines = [
    '| backbone | ' + ' | '.join(c[2] for c in cols) + ' |',
    '|---|' + '---:|' * len(cols),
  ]
  rows = [[] for _ in labels]
  for suite, key, _, higher, fmt in cols:
    values = [value(summary, lb, suite, key) for lb in labels]
    shown = [_shown(v, fmt) for v in values]
    numbers = [x for x in shown if x is not None]
    # Compared as shown, so cells that read the same are bold together.
    best = (max if higher else min)(numbers) if len(numbers) > 1 else None
    for i, (v, x) in enumerate(zip(values, shown)):
      text = format_value(v, fmt)
      if x is not None and x == best:
        text = f'**{text}**'
      if i and x is not None and shown[0] is not None:
        text += f' ({format_value(v - values[0], fmt, delta=True)})'
      rows[i].append(text)
  lines += [f'| {label} | ' + ' | '.join(cells) + ' |' for label, cells in zip(labels, rows)]
  return '\n'.join(lines)


def _notes(summary: dict) -> list[str]:
  """Baselines and settings per suite, from the first backbone's details."""
  first = summary['backbones'][0]['label']
  notes = []
  for s in summary['suites']:
    r = summary['results'][first][s['name']]
    details, protocol = r.get('details', {}), r.get('protocol', {})
    if s['name'] == 'synthetic':
      base = details['depth']['baselines']
      sets = ', '.join(f'{k} {v["count"]}' for k, v in protocol['sets'].items())
      notes += [
        f'- **synthetic**: {len(protocol["classes"])} shape classes (chance '
        f'{100 * details["chance_top1"]:.1f}%), {protocol["img_size"]} px; training textures '
        f'tied to the class with probability {protocol["texture_class_prob"]}, size '
        f'{protocol["train_size"]}; images per set: {sets}.',
        f'- **depth RMSE** (scene units; depths lie in [1.5, 2.5]): baselines on the same test '
        f'scenes: training-mean depth {base["mean_depth"]["rmse"]:.4f}, per-pixel mean map '
        f'{base["mean_map"]["rmse"]:.4f}.',
      ]
    elif s['name'] == 'nyu_depth':
      base = details['depth']['baselines']['mean_depth']
      st = protocol['settings']
      how = (
        f'DINOv2 linear head, {st["n_bins"]} bins on [{st["min_depth"]}, {st["max_depth"]}] m, '
        f'SigLoss + {st["grad_loss_weight"]} gradient loss, AdamW {st["lr"]}, {st["steps"]} steps '
        f'at batch {st["batch_size"]}'
        if protocol['depth_probe'] == 'linear'
        else 'ridge per-patch probe (closed form; not the DINOv2 protocol)'
      )
      notes.append(
        f'- **nyu_depth** (metres; {how}; features of centre crops, no training augmentation): '
        f'training-mean depth RMSE {base["rmse"]:.4f}, abs-rel {base["abs_rel"]:.4f}.'
      )
    if s['name'] == 'imagenet' and protocol.get('pug_imagenet'):
      pug, cc = protocol['pug_imagenet'], protocol['imagenet_3dcc']
      if pug['splits']:
        over = 'the mapped ImageNet logits' if pug['restrict'] else 'all 1000 logits'
        notes.append(
          f'- **PUG:ImageNet** ({", ".join(pug["splits"])}): argmax over {over}, counted right '
          "when it maps to the image's class (PUG's class_to_imagenet_idx.json); preprocessing "
          'centre crop 256 px, resized.'
        )
      if cc['corruptions']:
        notes += ['', _corruption_table(summary, cc['corruptions']), '']
    if 'probe' in protocol:
      p = protocol['probe']
      notes.append(
        f'- {s["name"]} linear probe: variants {", ".join(p["variants"])} × {len(p["lrs"])} '
        f'learning rates, {p["epochs"]} epochs at batch {p["batch_size"]}, SGD momentum 0.9, '
        'cosine to 0, head chosen on the validation set; training views: '
        + (
          f'{p["mode"]}.'
          if p.get('augment')
          else f"**{p.get('mode', 'fast')}** — the same features every epoch, not DINOv2's "
          'random-resized crops + flips (--config.probe.augment=True).'
        )
      )
  return notes


def _corruption_table(summary: dict, corruptions) -> str:
  """ImageNet-3DCC top-1 per corruption (mean over severities): rows backbones."""
  lines = [
    '| ImageNet-3DCC top-1 | ' + ' | '.join(corruptions) + ' |',
    '|---|' + '---:|' * len(corruptions),
  ]
  for b in summary['backbones']:
    cells = [value(summary, b['label'], 'imagenet', f'3dcc_{k}_top1') for k in corruptions]
    lines.append(
      f'| {b["label"]} | ' + ' | '.join(format_value(v, 'percent') for v in cells) + ' |'
    )
  return '\n'.join(lines)


def write(workdir: str, summary: dict) -> str:
  """Writes results.md and the figures into `workdir`; returns the Markdown."""
  pngs = figures.write(workdir, summary)
  first = summary['backbones'][0]['label']
  parts = [
    '# Evaluation',
    '',
    table(summary),
    '',
    f'Bold: best in the column (lowest for RMSE). In parentheses: difference to {first}, in '
    'the same unit (percentage points for percentages).',
    '',
    *_notes(summary),
    '',
    'Backbones: ' + '; '.join(f'{b["label"]} = `{b["spec"]}`' for b in summary['backbones']),
    '',
    'Every number with its protocol: results.json.',
    '',
    *[f'![{os.path.splitext(p)[0]}]({p})' for p in pngs],
    '',
  ]
  text = '\n'.join(parts)
  path = os.path.join(workdir, 'results.md')
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
  return text
