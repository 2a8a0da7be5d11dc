"""PNG figures of an evaluation, drawn with PIL (matplotlib is not a dependency).

<suite>.png                one panel per headline metric, one bar per backbone (same colour
                           for a backbone in every panel), the value printed above each bar;
                           percentages on a fixed 0–100 axis, other metrics from 0 to the
                           largest value; a dashed line marks a trivial predictor's value
                           (chance, the mean depth map) where the suite gives one
synthetic_shape_bias.png,  shape bias per class (by the image's shape), one marker per
shape_bias_per_category.png  backbone: the per-category plot of Geirhos et al. (x: 0 = texture
                           decisions only, 1 = shape decisions only)
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw, ImageFont

# Tableau 10: distinct, colour-blind friendly enough for a handful of backbones.
PALETTE = (
  (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
  (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
_TEXT, _AXIS, _GRID = (20, 20, 20), (90, 90, 90), (225, 225, 225)
_PANEL_H, _BAR_W, _GAP, _MARGIN = 220, 28, 10, 12


def _font(size: int = 13):
  return ImageFont.load_default(size=size)


def _text(draw, xy, text, font, anchor='la', fill=_TEXT):
  draw.text(xy, text, font=font, anchor=anchor, fill=fill)


def _dashes(draw, x0: int, x1: int, y: int) -> None:
  for x in range(x0, x1, 8):
    draw.line([x, y, min(x + 4, x1), y], fill=_AXIS, width=2)


def _legend(draw, labels, top: int, font) -> int:
  """Draws a colour key of the labels; returns the x where it ends."""
  x = _MARGIN
  for i, label in enumerate(labels):
    draw.rectangle([x, top + 3, x + 12, top + 15], fill=PALETTE[i % len(PALETTE)])
    _text(draw, (x + 18, top + 9), label, font, anchor='lm')
    x += 30 + int(draw.textlength(label, font=font))
  return x


def _legend_width(draw, labels, font) -> int:
  return _MARGIN + sum(30 + int(draw.textlength(lb, font=font)) for lb in labels)


def _shown(v, fmt):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return None
  return 100.0 * v if fmt == 'percent' else v


def bars(title: str, panels: list, labels: list[str]) -> Image.Image:
  """panels: [(panel title, [value per backbone or None], 'percent' | 'float', baseline)],
  baseline None or (value, name): a dashed line across the panel."""
  font, small = _font(13), _font(11)
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  inner = max(len(labels) * (_BAR_W + 4) + 16, 110)
  titles = [int(probe.textlength(p[0], font=small)) + 12 for p in panels]
  widths = [max(inner, t) for t in titles]
  legend = _legend_width(probe, labels, font) + 250 * any(p[3] for p in panels)
  width = max(_MARGIN * 2 + sum(widths) + _GAP * (len(panels) - 1), legend)
  height = 30 + 18 + _PANEL_H + 24 + 28
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  _text(draw, (_MARGIN, 8), title, _font(15))
  bottom = 30 + 18 + _PANEL_H
  x0, references = _MARGIN, []
  for (name, values, fmt, baseline), w in zip(panels, widths):
    shown = [_shown(v, fmt) for v in values]
    ref = _shown(baseline[0], fmt) if baseline else None
    finite = [v for v in shown if v is not None] + ([ref] if ref is not None else [])
    vmax = 100.0 if fmt == 'percent' else (max(finite) * 1.15 if finite and max(finite) > 0 else 1)
    _text(draw, (x0 + w // 2, 32), name, small, anchor='mt')
    for frac in (0.25, 0.5, 0.75, 1.0):
      y = bottom - int(frac * (_PANEL_H - 14))
      draw.line([x0, y, x0 + w, y], fill=_GRID)
    draw.line([x0, bottom, x0 + w, bottom], fill=_AXIS)
    left = x0 + (w - len(labels) * (_BAR_W + 4)) // 2
    for i, v in enumerate(shown):
      bx = left + i * (_BAR_W + 4)
      if v is None:
        _text(draw, (bx + _BAR_W // 2, bottom - 4), 'n/a', small, anchor='mb')
        continue
      h = int(max(0.0, v) / vmax * (_PANEL_H - 14))
      draw.rectangle([bx, bottom - h, bx + _BAR_W, bottom], fill=PALETTE[i % len(PALETTE)])
      label = f'{v:.1f}' if fmt == 'percent' else f'{v:.3f}'
      _text(draw, (bx + _BAR_W // 2, bottom - h - 2), label, small, anchor='mb')
    if ref is not None:
      y = bottom - int(max(0.0, ref) / vmax * (_PANEL_H - 14))
      _dashes(draw, x0, x0 + w, y)
      references.append(baseline[1])
    x0 += w + _GAP
  x = _legend(draw, labels, bottom + 8, font)
  if references:  # One legend entry names every panel's dashed line.
    _dashes(draw, x, x + 24, bottom + 17)
    names = ' / '.join(dict.fromkeys(references))
    _text(draw, (x + 30, bottom + 17), f'{names} (trivial predictor)', small, anchor='lm')
  return image


def per_class(title: str, classes: list[str], series: dict[str, list]) -> Image.Image:
  """Shape bias per class: rows = classes, x in [0, 1], one marker colour per backbone."""
  font, small = _font(13), _font(11)
  probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  name_w = max(int(probe.textlength(c, font=font)) for c in classes) + 16
  plot_w, row_h = 320, 22
  labels = list(series)
  width = max(_MARGIN * 2 + name_w + plot_w + 20, _legend_width(probe, labels, font))
  height = 40 + row_h * len(classes) + 40 + 28
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  _text(draw, (_MARGIN, 8), title, _font(15))
  x0, top = _MARGIN + name_w, 40
  bottom = top + row_h * len(classes)
  for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
    x = x0 + int(frac * plot_w)
    draw.line([x, top, x, bottom], fill=_AXIS if frac in (0.0, 1.0) else _GRID)
    _text(draw, (x, bottom + 4), f'{frac:g}', small, anchor='mt')
  _text(draw, (x0, bottom + 20), 'texture', small, anchor='lt')
  _text(draw, (x0 + plot_w, bottom + 20), 'shape', small, anchor='rt')
  for r, cls in enumerate(classes):
    y = top + r * row_h + row_h // 2
    _text(draw, (x0 - 8, y), cls, font, anchor='rm')
    for i, label in enumerate(labels):
      v = series[label][r]
      if v is None or (isinstance(v, float) and math.isnan(v)):
        continue
      x = x0 + int(v * plot_w)
      dy = (i - (len(labels) - 1) / 2) * 4  # Spread overlapping markers a little.
      draw.ellipse([x - 5, y + dy - 5, x + 5, y + dy + 5], fill=PALETTE[i % len(PALETTE)])
  _legend(draw, labels, bottom + 38, font)
  return image


def write(workdir: str, summary: dict) -> list[str]:
  """Draws every figure of `summary` (results.json's dict) into `workdir`; file names."""
  labels = [b['label'] for b in summary['backbones']]
  written = []

  def save(image: Image.Image, name: str) -> None:
    image.save(os.path.join(workdir, name))
    written.append(name)

  for s in summary['suites']:
    results = [summary['results'][lb][s['name']] for lb in labels]
    panels = [
      (
        title,
        [r['metrics'].get(key) for r in results],
        fmt,
        results[0].get('baselines', {}).get(key),
      )
      for key, title, _, fmt in s['columns']
    ]
    save(bars(f'{s["name"]} suite', panels, labels), f'{s["name"]}.png')
    per = {}
    for lb in labels:
      details = summary['results'][lb][s['name']].get('details', {})
      r = details.get('cue_conflict', {})
      per[lb] = r.get('per_class') or r.get('per_category')
    if all(per.values()):
      classes = list(next(iter(per.values())))
      series = {lb: [per[lb][c] for c in classes] for lb in labels}
      name = (
        'synthetic_shape_bias.png' if s['name'] == 'synthetic' else 'shape_bias_per_category.png'
      )
      save(per_class(f'{s["name"]}: shape bias per class', classes, series), name)
  return written
