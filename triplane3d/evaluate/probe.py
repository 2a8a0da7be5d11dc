"""A suite's linear probe: its settings, its training views and the grid fit (linear.py).

Two modes (`config.probe.augment`):

  fast (False, the default)  the heads train on the features of each training image's evaluation
      view (TFDS sets: the centre crop; synthetic scenes: the rendered image), the same features
      every epoch: one extraction pass, not DINOv2's protocol. Labelled in results.json
      (`protocol.probe.mode`) and in results.md's column titles, e.g. '(fast: centre crops)'.
  augmented (True)  DINOv2's: epoch e trains on the features of fresh random-resized-crop + flip
      views (augment.AugmentedViews) — K = `probe.augment_epochs` view sets (0: one per epoch,
      as DINOv2 does), epoch e using set e mod K. Each view set is extracted once and cached like
      any image set (K × the training set's extraction time and disk), and read one epoch at a
      time, so memory holds one epoch's features.

Validation and test sets always use the evaluation view (DINOv2: resize 256, centre crop 224).
"""

from __future__ import annotations

from triplane3d.evaluate import augment, features, linear

FAST_CROPS = 'fast: centre crops'  # Mode label of TFDS suites without augmentation.
FAST_SCENES = 'fast: no augmentation'  # ... of the synthetic suite (rendered images).


def settings(p, num_train: int, epochs=None, batch_size=None, fast_label=FAST_CROPS) -> dict:
  """The probe's settings from `config.probe` (epochs and batch_size overridable; the batch
  capped at the training set's size), with the mode and its label."""
  lrs = tuple(float(x) for x in p.lrs) or linear.LEARNING_RATES
  epochs = int(epochs or p.epochs)
  aug = bool(p.augment)
  views = int(p.augment_epochs) or epochs
  return {
    'lrs': list(lrs),
    'epochs': epochs,
    'batch_size': min(int(batch_size or p.batch_size), num_train),
    'seed': int(p.seed),
    'variants': list(features.VARIANTS),
    'augment': aug,
    'augment_epochs': views if aug else 0,
    'mode': f'augmented: {views} epochs of {augment.TRANSFORM} views' if aug else fast_label,
  }


def label(s: dict) -> str:
  """' (fast: ...)' for a column title in fast mode, '' when the probe is DINOv2's."""
  return '' if s['augment'] else f' ({s["mode"]})'


def train_sets(key: str, base, s: dict) -> dict:
  """{set key: image set} the probe trains on: `base` itself (fast) or its view sets."""
  if not s['augment']:
    return {key: base}
  return {
    f'{key}_aug{k}': augment.AugmentedViews(base, k, s['seed']) for k in range(s['augment_epochs'])
  }


def fit(feats, s: dict, num_classes: int, train: str = 'train', val: str = 'val') -> dict:
  """The grid (linear.fit_and_score_variants) on the features of `train_sets(train, ...)` (a
  mapping that may load on access), heads chosen on `val`."""
  va = features.variants(feats[val])
  if s['augment']:
    loaded: dict = {}

    def views(epoch: int) -> dict:
      k = f'{train}_aug{epoch % s["augment_epochs"]}'
      if k not in loaded:  # One epoch's features in memory at a time.
        loaded.clear()
        loaded[k] = features.variants(feats[k])
      return loaded[k]

    y = feats[f'{train}_aug0']['meta_label']
    x_train = {name: (lambda e, name=name: views(e)[name]) for name in va}
  else:
    y = feats[train]['meta_label']
    x_train = features.variants(feats[train])
  return linear.fit_and_score_variants(
    {name: (x_train[name], va[name]) for name in va}, y, feats[val]['meta_label'], num_classes,
    lrs=s['lrs'], epochs=s['epochs'], batch_size=s['batch_size'], seed=s['seed'],
  )  # fmt: skip
