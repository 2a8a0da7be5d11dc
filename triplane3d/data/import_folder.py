"""Turns an image folder into a TFDS ArrayRecord dataset with labels and file names.

  python -m triplane3d.data.import_folder --src=DIR --name=NAME --data_dir=DATA_DIR [--split=train]

Layouts: one sub-folder per class (`DIR/CLASS/.../IMG`, labels = sorted class folder names,
as ImageFolder) or flat (`DIR/IMG`, label -1 for every image). Features: `image` (encoded
bytes, see below), `label`, `file_name` (path relative to DIR: the stable key that precomputed
depth is checked against). Records are in sorted path order. Run once per split (e.g. train,
then validation with `--split=validation`); the metadata then lists every split written so far.

Image bytes: 8-bit RGB or greyscale JPEG / PNG files without transparency or EXIF rotation are
stored byte for byte. Every other file (CMYK, RGBA, palette, 16-bit, EXIF-rotated, other
formats) is decoded by `images.open_rgb` and stored re-encoded as RGB (JPEG quality 95, 4:4:4
chroma, when it was a JPEG, else PNG), so any reader, tfds' own decoder included, gets the 3
channels the `image` feature declares and the pixels training sees.

Each file is fully decoded at import. Unreadable or truncated files are skipped, as are
images over `Image.MAX_IMAGE_PIXELS` pixels (PIL's decompression-bomb limit, ~89 MP by
default; flag `--max_megapixels`); the tool reports written and skipped counts with the first
reasons, and fails without writing a dataset when no file could be imported.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import warnings

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from PIL import Image

from triplane3d.data import images, records

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
_EXIF_ORIENTATION = 0x0112


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


class NothingImportedError(ValueError):
  """No file of the folder could be imported (none found, or every one skipped)."""


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """What one import wrote: counts, and (relative path, reason) of each file left out."""

  scanned: int
  written: int
  converted: int  # Of `written`: re-encoded as 8-bit RGB (see the module docstring).
  skipped: tuple[tuple[str, str], ...]

  def summary(self, show: int = 5) -> str:
    lines = [
      f'{self.written} images written ({self.converted} converted to RGB), '
      f'{len(self.skipped)} of {self.scanned} files skipped'
    ]
    lines += [f'  skipped {rel}: {why}' for rel, why in self.skipped[:show]]
    if len(self.skipped) > show:
      lines.append(f'  ... and {len(self.skipped) - show} more')
    return '\n'.join(lines)


def _needs_conversion(im: Image.Image, data: bytes) -> bool:
  """Whether readers other than `images.open_rgb` (tfds decodes with plain PIL / OpenCV) would
  see other pixels or another channel count than `open_rgb` does in the original bytes."""
  return (
    im.format not in ('JPEG', 'PNG')
    or im.mode not in ('RGB', 'L')
    # 48-bit PNGs open as 'RGB' in PIL but as uint16 in OpenCV. (Byte 24: IHDR bit depth.)
    or (im.format == 'PNG' and data[24] != 8)
    or 'transparency' in im.info
    or getattr(im, 'n_frames', 1) > 1
    or im.getexif().get(_EXIF_ORIENTATION, 1) != 1
  )


def prepare(path: str) -> tuple[bytes, bool]:
  """(bytes to store, whether they were re-encoded) for one file; raises if it is unusable.

  Decodes the whole image (truncated files raise). Raises `Image.DecompressionBombWarning` (as an
  error) past `Image.MAX_IMAGE_PIXELS` pixels.
  """
  with open(path, 'rb') as f:
    data = f.read()
  with warnings.catch_warnings():
    # Over the cap is a skip, not a warning lost in the log (PIL itself errors only past 2×).
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    with Image.open(io.BytesIO(data)) as im:
      convert = _needs_conversion(im, data)
      fmt = im.format
      rgb = images.to_rgb(im)  # Full decode, also when the bytes are kept.
  if not convert:
    return data, False
  buf = io.BytesIO()
  # JPEG sources stay JPEG (photos as PNG are ~5× larger), at full chroma resolution so the
  # second generation loses little; the rest becomes lossless PNG.
  if fmt == 'JPEG':
    rgb.save(buf, 'JPEG', quality=95, subsampling=0)
  else:
    rgb.save(buf, 'PNG')
  return buf.getvalue(), True


def _examples(src: str, files: list[tuple[str, int]], skipped: list, counts: dict):
  for rel, label in files:
    try:
      data, converted = prepare(os.path.join(src, rel))
    except Exception as err:  # Unreadable, truncated or over the size cap: leave it out.
      reason = f'{type(err).__name__}: {err}'
      if isinstance(err, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        reason += ' (cap: --max_megapixels, i.e. PIL.Image.MAX_IMAGE_PIXELS)'
      logging.warning('skipping %s: %s', rel, reason)
      skipped.append((rel, reason))
      continue
    counts['converted'] += converted
    counts['written'] += 1
    yield {'image': data, 'label': label, 'file_name': rel}


def import_folder(
  src: str, name: str, data_dir: str, split: str = 'train', examples_per_shard: int = 1024
) -> ImportReport:
  """Writes `src` as split `split` of dataset `name` under `data_dir`.

  Raises NothingImportedError (after writing nothing readable: no metadata) when every file
  was skipped.
  """
  classes, files = scan(src)
  if not files:
    raise NothingImportedError(f'no images found in {src} (extensions {EXTENSIONS}).')
  n = max(1, -(-len(files) // examples_per_shard))
  feats = features(classes)
  skipped, counts = [], {'written': 0, 'converted': 0}
  description = f'Imported from {src} by triplane3d.data.import_folder.'
  for s in range(n):
    part = files[s * len(files) // n : (s + 1) * len(files) // n]
    records.write_shard(data_dir, name, split, feats, _examples(src, part, skipped, counts), s, n)
  report = ImportReport(len(files), counts['written'], counts['converted'], tuple(skipped))
  if not report.written:
    for s in range(n):  # Empty shards would make an empty split readable.
      os.remove(records.shard_path(data_dir, name, split, s, n))
    if records.is_prepared(data_dir, name):  # Metadata of earlier runs must drop this split.
      records.finalize(data_dir, name, feats, description)
    raise NothingImportedError(
      f'none of the {len(files)} files in {src} could be imported, so no dataset was written; '
      f'fix or remove them and rerun.\n{report.summary()}'
    )
  records.finalize(data_dir, name, feats, description)
  return report


def _define_flags():
  # Only when run as a program: importing this module must not register global absl flags.
  flags.DEFINE_string('src', None, 'Image folder (class sub-folders, or flat).', required=True)
  flags.DEFINE_string('name', None, 'Dataset name.', required=True)
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to write into.', required=True)
  flags.DEFINE_string('split', 'train', 'Split name.')
  flags.DEFINE_integer('examples_per_shard', 1024, 'Records per ArrayRecord file.')
  flags.DEFINE_float(
    'max_megapixels',
    Image.MAX_IMAGE_PIXELS / 1e6,
    "Images with more pixels are skipped as possible decompression bombs (default: PIL's "
    'own limit, Image.MAX_IMAGE_PIXELS).',
  )


def main(argv):
  del argv
  f = flags.FLAGS
  # PIL's global is the one owner of the cap (`prepare` reads it); as a program we own it.
  Image.MAX_IMAGE_PIXELS = int(f.max_megapixels * 1e6)
  try:
    report = import_folder(f.src, f.name, f.data_dir, f.split, f.examples_per_shard)
  except NothingImportedError as err:
    sys.exit(f'import_folder: {err}')  # Non-zero exit: scripts must not go on to train.
  print(f'{f.name}/{f.split} in {records.dataset_dir(f.data_dir, f.name)} from {f.src}:')
  print(report.summary())


if __name__ == '__main__':
  _define_flags()
  app.run(main)
