"""Turns an image folder into a TFDS ArrayRecord dataset with labels and file names.

  python -m triplane3d.data.import_folder --src=DIR --name=NAME --data_dir=DATA_DIR [--split=train]

Layouts: one sub-folder per class (`DIR/CLASS/.../IMG`, labels = sorted class folder names,
as ImageFolder) or flat (`DIR/IMG`, label -1 for every image). Features: `image` (the file's
original encoded bytes, any format PIL reads), `label`, `file_name` (path relative to DIR: the
stable key that precomputed depth is checked against). Records are in sorted path order.
Unreadable files are skipped with a warning. Run once per split (e.g. train, then validation
with `--split=validation`); the metadata then lists every split written so far.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from PIL import Image

from triplane3d.data import records

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def scan(src: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(class names, [(relative path, label)]) of an image folder, in sorted order."""
  classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith('.'))
  files = []
  for label, cls in enumerate(classes):
    for root, _, names in sorted(os.walk(os.path.join(src, cls))):
      for n in sorted(names):
        if n.lower().endswith(EXTENSIONS):
          files.append((os.path.relpath(os.path.join(root, n), src), label))
  flat = sorted(
    (e.name, -1) for e in os.scandir(src) if e.is_file() and e.name.lower().endswith(EXTENSIONS)
  )
  if files and flat:
    raise ValueError(f'{src} mixes class folders and loose images; pick one layout.')
  return (classes, files) if files else ([], flat)


def features(classes: list[str]) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3)),
      # Flat folders have no classes: an int64 scalar allows the -1 "no label".
      'label': tfds.features.ClassLabel(names=classes)
      if classes
      else tfds.features.Scalar(dtype=np.int64),
      'file_name': tfds.features.Text(),
    }
  )


def _examples(src: str, files: list[tuple[str, int]]):
  for rel, label in files:
    path = os.path.join(src, rel)
    try:
      with Image.open(path) as im:
        im.verify()  # Cheap structural check; the pipeline still guards full decodes.
      with open(path, 'rb') as f:
        data = f.read()
    except Exception as err:  # Unreadable file: leave it out of the dataset.
      logging.warning('skipping unreadable image %s: %s', path, err)
      continue
    yield {'image': data, 'label': label, 'file_name': rel}


def import_folder(
  src: str, name: str, data_dir: str, split: str = 'train', examples_per_shard: int = 1024
) -> int:
  """Writes `src` as split `split` of dataset `name` under `data_dir`. Returns #files scanned."""
  classes, files = scan(src)
  if not files:
    raise ValueError(f'no images found in {src} (extensions {EXTENSIONS}).')
  n = max(1, -(-len(files) // examples_per_shard))
  feats = features(classes)
  for s in range(n):
    part = files[s * len(files) // n : (s + 1) * len(files) // n]
    records.write_shard(data_dir, name, split, feats, _examples(src, part), s, n)
  records.finalize(data_dir, name, feats, f'Imported from {src} by triplane3d.data.import_folder.')
  return len(files)


def _define_flags():
  # Only when run as a program: importing this module must not register global absl flags.
  flags.DEFINE_string('src', None, 'Image folder (class sub-folders, or flat).', required=True)
  flags.DEFINE_string('name', None, 'Dataset name.', required=True)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to write into.', required=True)
  flags.DEFINE_string('split', 'train', 'Split name.')
  flags.DEFINE_integer('examples_per_shard', 1024, 'Records per ArrayRecord file.')


def main(argv):
  del argv
  f = flags.FLAGS
  n = import_folder(f.src, f.name, f.data_dir, f.split, f.examples_per_shard)
  print(
    f'{f.name}/{f.split}: {n} images from {f.src} into {records.dataset_dir(f.data_dir, f.name)}'
  )


if __name__ == '__main__':
  _define_flags()
  app.run(main)
