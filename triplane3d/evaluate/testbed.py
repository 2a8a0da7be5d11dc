"""The paper's comparison on a laptop: does 3D-Prior make a texture-biased backbone more
shape-biased? A small world whose ground truth we control (`triplane3d.data.synthetic`).

  python -m triplane3d.evaluate.testbed --workdir=OUT [--size=small|tiny] [--seeds=3]
      [--split=test|val]

Stages, each resumable (a stage that finished is read back, an interrupted one continues):

  1. teacher     once, shared by every seed (as every run of the paper starts from the same
                 DINOv2): `triplane3d.pretrain` from random weights on scenes where texture
                 goes with the class (configs/testbed.py `texture_prob`), naming the texture
                 and where the objects are, never the shape: the stand-in for DINOv2.
  2. arms        per seed, each from the teacher, same steps and scenes, only the objective
                 differs (ARMS): 3D-Prior; without distillation; with the conv decoder (no
                 triplane); RGB-only reconstruction (depth weight 0: is it the depth or just
                 autoencoding?); on degraded depth (blurred and noisy: how much does the
                 pseudo depth's quality matter?); and more teacher training (the teacher's own
                 objective for the same steps: is it just extra steps?).
  3. evaluate    the synthetic suite (`evaluate.synthetic_suite`) on the teacher and every arm:
                 linear-probe top-1 in distribution, on novel textures and on other sizes,
                 cue-conflict shape bias, per-patch depth probe RMSE. `--split=val` evaluates on
                 the suite's sets drawn from other seeds: where knobs are chosen.
  4. report      OUT/<split>/results.md (mean ± std over seeds), shape_bias.png (per arm, seeds
                 as points, like the paper's Figure 4), reconstructions.png (each
                 reconstruction arm's renders of the same training scenes, seed 0) and
                 results.json.

OUT/testbed.json records the config: resuming with another one is refused (use another OUT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from triplane3d import run_config
from triplane3d.evaluate import runner

ARMS = ('3d_prior', 'no_distill', 'conv_decoder', 'rgb_only', 'degraded_depth', 'more_teacher')
ROWS = ('teacher', *ARMS)
DESCRIPTIONS = {
  'teacher': 'the stand-in for DINOv2: names textures, never told shapes (start of every arm)',
  '3d_prior': '3D-Prior: RGB + depth reconstruction, distillation (paper weights)',
  'no_distill': '3D-Prior without distillation',
  'conv_decoder': '3D-Prior with a conv decoder to RGB + depth (no triplane, no renderer)',
  'rgb_only': 'RGB reconstruction only (depth weight 0), with distillation',
  'degraded_depth': '3D-Prior on blurred, noisy depth',
  'more_teacher': "the teacher's own objective for the same steps",
}
# (key, title, format, higher is better): the synthetic suite's metrics, then reconstruction.
COLUMNS = (
  ('test_top1', 'ID top-1', 'percent', True),
  ('texture_top1', 'novel-texture top-1', 'percent', True),
  ('size_top1', 'other-size top-1', 'percent', True),
  ('shape_bias', 'shape bias', 'percent', True),
  ('depth_rmse', 'depth probe RMSE', 'float', False),
  ('shape_readout', 'shape read-out', 'percent', True),
  ('texture_readout', 'texture read-out', 'percent', True),
  ('heldout_psnr', 'recon. PSNR (dB)', 'db', True),
  ('heldout_depth_abs', 'recon. depth abs err', 'float', False),
)


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------------
# Stage 1: the teacher.


def teacher_options(tb, seed: int, **changes):
  """`pretrain.Options` of the teacher (`seed`: its initialisation and batch order; the
  `more_teacher` arm passes its testbed seed) with `changes`."""
  from triplane3d import pretrain

  t = tb.teacher
  o = pretrain.Options(
    variant=tb.variant,
    img_size=tb.img_size,
    texture_mode='mixed',
    texture_class_prob=tb.texture_prob,
    num_scenes=t.num_scenes,
    num_val=t.num_val,
    scene_seed=t.scene_seed,
    val_seed=t.val_seed,
    steps=t.steps,
    batch_size=t.batch_size,
    lr=t.lr,
    warmup_steps=t.warmup_steps,
    segment_weight=t.segment_weight,
    segment_labels=t.segment_labels,
    shuffle_prob=t.shuffle_prob,
    texture_weight=t.texture_weight,
    shape_weight=t.shape_weight,
    seed=seed,
    log_every=max(1, t.steps // 4),
  )
  return dataclasses.replace(o, **changes)


def _save_classifier(path: str, params) -> None:
  from flax import serialization

  with open(path + '.tmp', 'wb') as f:
    f.write(serialization.msgpack_serialize(params))
  os.replace(path + '.tmp', path)


def _load_classifier(path: str) -> dict:
  from flax import serialization

  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


def teacher_dir(out: str) -> str:
  return os.path.join(out, 'teacher')


def teacher(tb, out: str) -> dict:
  """Trains the teacher (seed `teacher.seed`) into OUT/teacher/ unless it is there.

  Writes backbone.safetensors (DINOv2 keys: what the arms start from and distil to),
  classifier.msgpack (with the heads: what `more_teacher` continues) and done.json (last).
  """
  from triplane3d import convert, pretrain

  d = teacher_dir(out)
  if (record := _read_json(os.path.join(d, 'done.json'))) is not None:
    return record
  os.makedirs(d, exist_ok=True)
  start = time.perf_counter()
  o = teacher_options(tb, tb.teacher.seed)
  params, history = pretrain.train(o)
  _save_classifier(os.path.join(d, 'classifier.msgpack'), params)
  convert.save_dinov2(params['backbone'], os.path.join(d, 'backbone.safetensors'))
  record = {
    'options': dataclasses.asdict(o),
    'history': history,
    'wall_s': time.perf_counter() - start,
  }
  runner.write_json(os.path.join(d, 'done.json'), record)
  return record


# ---------------------------------------------------------------------------------------------
# Stage 2: the arms.


def arm_config(tb, out: str, seed: int, arm: str):
  """The training config (configs/demo.py's model) of one reconstruction arm."""
  from triplane3d.configs import demo

  if arm not in ARMS or arm == 'more_teacher':
    raise ValueError(f'{arm!r} is not a reconstruction arm: {ARMS[:-1]}.')
  f = tb.finetune
  c = demo.get_config()
  c.seed = f.data_seed + seed
  c.model.img_size = tb.img_size
  c.model.init_from = os.path.join(teacher_dir(out), 'backbone.safetensors')
  c.data.num_synthetic = f.num_scenes
  c.data.synthetic_texture_prob = tb.texture_prob
  c.data.data_dir = os.path.join(out, 'data', f'seed{seed}')
  c.loss.rgb_weight = f.rgb_weight  # depth 1, distillation 1, norm 1e-3: configs/common.py.
  c.train.num_steps = f.steps
  c.train.batch_size = f.batch_size
  c.train.log_every_steps = max(1, f.steps // 10)
  c.train.image_every_steps = f.steps
  c.train.ckpt_every_steps = max(1, f.steps // 3)
  c.train.keep_ckpts = 1
  c.eval.num_heldout = f.num_heldout
  if arm == 'no_distill':
    c.loss.dist_weight = 0.0
  elif arm == 'conv_decoder':  # As configs/ablations.py:no_triplane.
    c.decoder.kind = 'conv'
    c.loss.norm_weight = 0.0
    c.optim.lr_mults = (('.*', 1.0),)  # No plane embeddings to speed up.
  elif arm == 'rgb_only':
    c.loss.depth_weight = 0.0
  elif arm == 'degraded_depth':
    c.data.data_dir += '-degraded'
    c.data.synthetic_depth_blur = f.depth_blur
    c.data.synthetic_depth_noise = f.depth_noise
  return c


def more_teacher_options(tb, seed: int):
  """The `more_teacher` arm: the teacher's objective (its heads, shuffling, texture tie) on
  the fine-tuning scenes (same seed, count and flips), for the arms' steps and batch size.
  Its optimiser is the teacher's (AdamW, 10% warm-up then cosine, lr `teacher.lr`): the arms
  keep configs/demo.py's constant-rate Adam."""
  f = tb.finetune
  return teacher_options(
    tb,
    seed,
    scene_seed=f.data_seed + seed,
    num_scenes=f.num_scenes,
    steps=f.steps,
    batch_size=f.batch_size,
    warmup_steps=max(1, f.steps // 10),
    log_every=max(1, f.steps // 3),
  )


def degraded_target_error(tb, seed: int, num: int = 64) -> dict:
  """How far the degraded-depth arm's targets (after the pipeline's resize to the renderer's
  side) are from the exact ones, on its first `num` scenes: {'rmse', 'abs'} in scene units."""
  from triplane3d.evaluate import reconstruction

  c = arm_config(tb, '', seed, 'degraded_depth')
  e = np.stack(
    [
      reconstruction.scene_example(c, i, as_trained=True)['depth'].astype(np.float64)
      - reconstruction.scene_example(c, i)['depth']
      for i in range(num)
    ]
  )
  return {'rmse': float(np.sqrt(np.mean(e**2))), 'abs': float(np.mean(np.abs(e)))}


def _heldout(workdir: str) -> dict:
  """The last held-out metrics in the run's metrics.jsonl (heldout/<name> → name)."""
  found = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        row = json.loads(line)
        if any(k.startswith('heldout/') for k in row):
          found = {k.split('/', 1)[1]: v for k, v in row.items() if k.startswith('heldout/')}
  return found


def arm(tb, out: str, seed: int, name: str) -> dict:
  """Trains one arm into OUT/arms/seed<k>/<name>/ unless done; returns its done.json record:
  {'spec': the backbone spec for the evaluation, 'heldout': reconstruction metrics, ...}."""
  d = os.path.join(out, 'arms', f'seed{seed}', name)
  if (record := _read_json(os.path.join(d, 'done.json'))) is not None:
    return record
  start = time.perf_counter()
  if name == 'more_teacher':
    from triplane3d import convert, pretrain

    o = more_teacher_options(tb, seed)
    init = _load_classifier(os.path.join(teacher_dir(out), 'classifier.msgpack'))
    params, history = pretrain.train(o, init=init)
    os.makedirs(d, exist_ok=True)
    spec = os.path.join(d, 'backbone.safetensors')
    convert.save_dinov2(params['backbone'], spec)
    record = {'spec': spec, 'history': history, 'heldout': {}}
  else:
    from triplane3d import train

    result = train.run(arm_config(tb, out, seed, name), d)
    if result['preempted']:
      sys.exit(f'{name} (seed {seed}) was stopped by a signal; rerun the same command to resume.')
    record = {'spec': d, 'step': result['step'], 'heldout': _heldout(d)}
    if name == 'degraded_depth':
      record['target_error'] = degraded_target_error(tb, seed)
  record['wall_s'] = time.perf_counter() - start
  runner.write_json(os.path.join(d, 'done.json'), record)
  return record


# ---------------------------------------------------------------------------------------------
# Stage 3: evaluation.


def eval_config(tb, split: str, backbones: str):
  from triplane3d.configs.eval import synthetic as eval_synthetic

  c = eval_synthetic.get_config('tiny' if tb.size == 'tiny' else None)
  c.img_size = tb.img_size
  c.synthetic.seed = tb.eval.test_seed if split == 'test' else tb.eval.val_seed
  c.synthetic.num_train = tb.eval.num_train
  c.synthetic.num_shift = tb.eval.num_shift
  c.synthetic.num_test = tb.eval.num_test
  c.backbones = backbones
  return c


def evaluate(tb, out: str, split: str, specs: dict[str, str]) -> dict:
  """The synthetic suite on {label: spec} into OUT/<split>/eval (cached per backbone), plus
  each backbone's cue read-out (`cue_readout`) as summary['readout'][label]."""
  from triplane3d.evaluate import features

  backbones = ','.join(f'{label}={spec}' for label, spec in specs.items())
  run = runner.Run(eval_config(tb, split, backbones), os.path.join(out, split, 'eval'))
  summary = run.execute()
  sets = {k: v for k, v, _ in run.suites[0].image_sets()}
  summary['readout'] = {}
  for b in run.backbones:  # The depth sets' features: extracted with patches.
    names = ('depth_train', 'depth_val', 'depth_test')
    feats = [
      features.FeatureStore.load(run.store.path(b.label, sets[n], b.identity, True)) for n in names
    ]
    summary['readout'][b.label] = cue_readout(*feats)
  return summary


def cue_readout(train: dict, val: dict, test: dict) -> dict[str, float]:
  """Which cue a linear read-out finds in a backbone's pooled features (last block's class
  token and mean patch token): top-1 of ridge classifiers (one-hot least squares on
  standardised features, alpha from 10⁻²…10⁴ chosen on `val`) for the object's shape and for
  its texture family, fit on `train` and scored on `test`. The suite's depth sets serve: their
  textures are drawn independently of the shape, so neither cue helps read the other (chance
  20% each). A backbone that reads texture shows it here, whatever the probe's choice."""

  def pooled(f):
    return np.concatenate([f['cls'][:, -1], f['patch_mean']], -1).astype(np.float64)

  x_tr, x_va, x_te = (pooled(f) for f in (train, val, test))
  mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
  x_tr, x_va, x_te = (np.c_[(x - mu) / sd, np.ones(len(x))] for x in (x_tr, x_va, x_te))
  gram, eye = x_tr.T @ x_tr, np.eye(x_tr.shape[1])
  out = {}
  for name, key in (('shape_readout', 'meta_label'), ('texture_readout', 'meta_texture_label')):
    y = np.eye(5)[train[key]]
    best = None
    for alpha in 10.0 ** np.arange(-2, 5):
      w = np.linalg.solve(gram + alpha * eye, x_tr.T @ y)
      acc = float(np.mean((x_va @ w).argmax(1) == val[key]))
      if best is None or acc > best[0]:
        best = (acc, w)
    out[name] = float(np.mean((x_te @ best[1]).argmax(1) == test[key]))
  return out


# ---------------------------------------------------------------------------------------------
# Stage 4: the report.


def collect(summary: dict, arms: dict[tuple[str, int], dict]) -> dict[str, dict[str, list]]:
  """{row: {column key: [value per seed]}} from the evaluation summary and the arms' records."""
  table: dict[str, dict[str, list]] = {}
  for label, result in summary['results'].items():
    row, seed = label.rsplit('-s', 1)
    metrics = {**result['synthetic']['metrics'], **summary.get('readout', {}).get(label, {})}
    heldout = arms.get((row, int(seed)), {}).get('heldout', {})
    metrics['heldout_psnr'] = heldout.get('psnr')
    metrics['heldout_depth_abs'] = heldout.get('depth_abs')
    for key, *_ in COLUMNS:
      table.setdefault(row, {}).setdefault(key, []).append(metrics.get(key))
  return table


def mean_std(values: list) -> tuple[float, float | None, int] | None:
  """(mean, sample std (None for one value), count) of the non-None values; None if none."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if not len(v):
    return None
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v)


def _cell(values: list, fmt: str) -> str:
  s = mean_std(values)
  if s is None:
    return '–'
  m, sd, n = s
  scale, digits = {'percent': (100, 1), 'db': (1, 2)}.get(fmt, (1, 4))
  # One value (the shared teacher, or a single seed) has no spread to show.
  return f'{scale * m:.{digits}f}' + (f' ± {scale * sd:.{digits}f}' if n > 1 else '')


def markdown(table: dict, num_seeds: int, split: str, baselines: dict) -> str:
  """results.md: rows teacher + arms, columns COLUMNS, mean ± std (sample std) over seeds; the
  teacher, one run shared by every seed, is one value."""
  head = '| | ' + ' | '.join(c[1] for c in COLUMNS) + ' |'
  lines = [
    f'# Shape-bias testbed ({split} sets, {num_seeds} seed(s): mean ± std; the teacher is one '
    'run, shared)',
    '',
    head,
    '|' + '---|' * (len(COLUMNS) + 1),
  ]
  for row in ROWS:
    if row in table:
      cells = [_cell(table[row][k], fmt) for k, _, fmt, _ in COLUMNS]
      lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Trivial predictors: ' + baselines_line(baselines), '']
  lines += [
    'Read-outs: ridge classifiers for the shape and for the texture family on pooled features '
    'of scenes whose texture is independent of the shape (the depth sets; chance 20% each): '
    'which cue the features make linearly readable at all (`cue_readout`).',
    '',
  ]
  lines += [f'- **{r}**: {DESCRIPTIONS[r]}' for r in ROWS if r in table]
  return '\n'.join(lines) + '\n'


def baselines_line(b: dict) -> str:
  parts = ['chance top-1 20.0%']
  if b.get('depth_rmse') is not None:
    parts.append(f'depth probe: mean map RMSE {b["depth_rmse"]:.4f}')
  if b.get('psnr') is not None:
    parts.append(
      f'reconstruction: mean colour {b["psnr"]:.2f} dB, median depth map abs err '
      f'{b["depth_abs"]:.4f}'
    )
  return '; '.join(parts) + '.'


def shape_bias_figure(table: dict, path: str) -> None:
  """Shape bias per row (x), one dot per seed, the mean as a bar; the teacher's mean dashed."""
  from PIL import Image, ImageDraw

  from triplane3d.evaluate import figures

  rows = [r for r in ROWS if r in table]
  w_col, top, h, left = 96, 40, 260, 56
  image = Image.new('RGB', (left + w_col * len(rows) + 16, top + h + 60), 'white')
  draw = ImageDraw.Draw(image)
  font, small = figures._font(13), figures._font(11)
  draw.text(
    (left, 10), 'Cue-conflict shape bias per arm (dots: seeds; bar: mean)', font=font, fill=0
  )

  def y(v):
    return top + h - int(v * h)

  for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
    draw.line([left, y(frac), image.width - 8, y(frac)], fill=(225, 225, 225))
    draw.text((left - 6, y(frac)), f'{int(100 * frac)}%', font=small, fill=0, anchor='rm')
  teacher = mean_std(table.get('teacher', {}).get('shape_bias', []))
  if teacher is not None:
    figures._dashes(draw, left, image.width - 8, y(teacher[0]))
  for i, row in enumerate(rows):
    cx = left + w_col * i + w_col // 2
    color = figures.PALETTE[i % len(figures.PALETTE)]
    values = [v for v in table[row]['shape_bias'] if v is not None]
    for j, v in enumerate(values):
      dx = (j - (len(values) - 1) / 2) * 9
      draw.ellipse([cx + dx - 4, y(v) - 4, cx + dx + 4, y(v) + 4], fill=color)
    if values:
      m = float(np.mean(values))
      draw.line([cx - 22, y(m), cx + 22, y(m)], fill=color, width=3)
    draw.text((cx, top + h + 8), row, font=small, fill=0, anchor='mt')
  draw.text(
    (left, top + h + 30), 'dashed: the teacher (mean); 50%: as many shape as texture decisions',
    font=small, fill=(90, 90, 90),
  )  # fmt: skip
  image.save(path)


def reconstructions_figure(out: str, seed: int, path: str) -> bool:
  """The reconstruction arms' final image grids of one seed, stacked: the trainer's fixed
  examples (input | RGB | depth | targets), the same scenes for every arm."""
  from PIL import Image, ImageDraw

  from triplane3d.evaluate import figures

  grids = []
  for name in ARMS[:-1]:
    d = os.path.join(out, 'arms', f'seed{seed}', name, 'images')
    files = sorted(os.listdir(d)) if os.path.isdir(d) else []
    if files:
      grids.append((name, Image.open(os.path.join(d, files[-1])).convert('RGB')))
  if not grids:
    return False
  width = max(g.width for _, g in grids)
  image = Image.new('RGB', (width, sum(g.height + 22 for _, g in grids)), 'white')
  draw, y0 = ImageDraw.Draw(image), 0
  for name, g in grids:
    note = ' (target depth: the degraded one it trains on)' if name == 'degraded_depth' else ''
    text = f'{name}: {DESCRIPTIONS[name]}{note}'
    draw.text((4, y0 + 4), text, font=figures._font(13), fill=0)
    image.paste(g, (0, y0 + 22))
    y0 += g.height + 22
  image.save(path)
  return True


def report(out: str, split: str, summary: dict, arms: dict, seeds: list[int], wall: dict) -> str:
  """Writes OUT/<split>/results.md, results.json and the figures; returns the markdown."""
  d = os.path.join(out, split)
  table = collect(summary, arms)
  first = next(iter(summary['results'].values()))['synthetic']
  base = {'depth_rmse': first.get('baselines', {}).get('depth_rmse', [None])[0]}
  held = [r['heldout'] for r in arms.values() if r.get('heldout')]
  if held:
    base['psnr'] = float(np.mean([h['baseline_psnr'] for h in held]))
    base['depth_abs'] = float(np.mean([h['baseline_depth_abs'] for h in held]))
  md = markdown(table, len(seeds), split, base)
  errors = [r['target_error'] for r in arms.values() if r.get('target_error')]
  if errors:
    md += (
      "\nThe degraded_depth arm's targets against the exact ones (its first 64 scenes, at the "
      f"renderer's side): RMSE {np.mean([e['rmse'] for e in errors]):.4f}, abs err "
      f'{np.mean([e["abs"] for e in errors]):.4f} (scene units; mean over seeds).\n'
    )
  shape_bias_figure(table, os.path.join(d, 'shape_bias.png'))
  has_recon = reconstructions_figure(out, seeds[0], os.path.join(d, 'reconstructions.png'))
  md += '\n![shape bias](shape_bias.png)\n'
  if has_recon:
    md += f'\n![reconstructions, seed {seeds[0]}](reconstructions.png)\n'
  md += '\nWall time (s): ' + ', '.join(f'{k} {v:.0f}' for k, v in wall.items()) + '\n'
  with open(os.path.join(d, 'results.md'), 'w') as f:
    f.write(md)
  stats = {
    row: {
      k: dict(zip(('mean', 'std', 'n'), mean_std(v) or (None, None, 0))) for k, v in cols.items()
    }
    for row, cols in table.items()
  }
  runner.write_json(
    os.path.join(d, 'results.json'),
    {'seeds': seeds, 'per_seed': table, 'stats': stats, 'baselines': base, 'wall_s': wall},
  )
  return md


# ---------------------------------------------------------------------------------------------
# The pipeline.


def check_workdir(tb, out: str) -> None:
  """Records the config in OUT/testbed.json, or refuses an OUT made with another config."""
  path = os.path.join(out, 'testbed.json')
  current = json.loads(json.dumps(tb.to_dict()))
  existing = _read_json(path)
  if existing is None:
    runner.write_json(path, current)
  elif existing != current:
    old, new = run_config.flat(existing), run_config.flat(current)
    diff = ', '.join(
      f'{k}: {old.get(k)!r} → {new.get(k)!r}'
      for k in sorted({*old, *new})
      if old.get(k) != new.get(k)
    )
    raise ValueError(
      f'{out} holds a testbed made with another config ({diff}); pass the same --size (and '
      'configs/testbed.py) to resume it, or another --workdir.'
    )


def generator_seeds(tb, seeds) -> dict[str, set[int]]:
  """The synthetic generator seeds each part of the testbed draws scenes from (the suite uses
  9 consecutive seeds per split), beside the demo's and the shipped stand-in's."""
  n = 9  # synthetic_suite.SyntheticSuite: train, val, test, texture, size, conflict, 3 depth.
  return {
    'teacher': {tb.teacher.scene_seed, tb.teacher.val_seed},
    'fine-tuning': {tb.finetune.data_seed + s for s in seeds},
    'test suite': set(range(tb.eval.test_seed, tb.eval.test_seed + n)),
    'validation suite': set(range(tb.eval.val_seed, tb.eval.val_seed + n)),
    'demo and shipped stand-in': {0, 1, 3001, 3002},
  }


def check_seeds(tb, seeds) -> None:
  """Raises ValueError naming the parts whose scenes would share a generator seed."""
  groups = generator_seeds(tb, seeds)
  names = list(groups)
  clashes = [
    f'{a} and {b} ({sorted(groups[a] & groups[b])})'
    for i, a in enumerate(names)
    for b in names[i + 1 :]
    if groups[a] & groups[b]
  ]
  if clashes:
    raise ValueError(
      'these would draw the same scenes: ' + '; '.join(clashes) + '. Use fewer --seeds or move '
      'the seeds in configs/testbed.py.'
    )


def run(tb, out: str, seeds: list[int], split: str = 'test') -> str:
  """Every stage for `seeds` (each skipped when done); returns results.md."""
  if split not in ('test', 'val'):
    raise ValueError(f"split must be 'test' or 'val', got {split!r}.")
  if ',' in out or '=' in out:  # The evaluation's backbone list is 'LABEL=SPEC,...'.
    raise ValueError(f'the workdir must not contain "," or "=": {out!r}.')
  check_workdir(tb, out)
  wall_path = os.path.join(out, 'wall.json')

  def timed(stage, fn, *args):
    """Runs a stage; adds its seconds to OUT/wall.json at once (compute time over every
    invocation: a resumed run adds what it did, a stage read back adds ~0)."""
    start = time.perf_counter()
    result = fn(*args)
    wall = _read_json(wall_path) or {}
    wall[stage] = wall.get(stage, 0.0) + time.perf_counter() - start
    runner.write_json(wall_path, wall)
    return result

  check_seeds(tb, seeds)
  specs: dict[str, str] = {}
  arms: dict[tuple[str, int], dict] = {}
  timed('teacher', teacher, tb, out)
  print('teacher ready', flush=True)
  specs[f'teacher-s{tb.teacher.seed}'] = os.path.join(teacher_dir(out), 'backbone.safetensors')
  for seed in seeds:
    for name in ARMS:
      arms[(name, seed)] = timed('arms', arm, tb, out, seed, name)
      specs[f'{name}-s{seed}'] = arms[(name, seed)]['spec']
      print(f'seed {seed}: {name} ready', flush=True)
  summary = timed(f'evaluate_{split}', evaluate, tb, out, split, specs)
  wall = _read_json(wall_path)
  shown = {k: wall.get(k, 0.0) for k in ('teacher', 'arms', f'evaluate_{split}')}
  shown['total'] = sum(shown.values())
  return report(out, split, summary, arms, seeds, shown)


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Output directory (resumable).', required=True)
  flags.DEFINE_enum('size', 'small', ['small', 'tiny'], 'configs/testbed.py size.')
  flags.DEFINE_integer('seeds', 3, 'Seeds 0..N-1.')
  flags.DEFINE_enum('split', 'test', ['test', 'val'], "Evaluation sets: 'val' to choose knobs.")


def main(argv):
  del argv
  from triplane3d.configs import testbed as testbed_config

  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  tb = testbed_config.get_config(f.size)
  start = time.perf_counter()
  md = run(tb, f.workdir, list(range(f.seeds)), f.split)
  print(md)
  print(f'{time.perf_counter() - start:.0f} s; wrote {f.workdir}/{f.split}/results.md')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
