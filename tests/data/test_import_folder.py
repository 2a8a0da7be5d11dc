"""import_folder on real files written by PIL: full decode at import, the written / skipped
report, failing when nothing is importable, the decompression-bomb cap, and re-encoding of
files whose bytes would decode to other than 3 channels (read back through tfds)."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from triplane3d.data import images, import_folder, records

_EXIF_ORIENTATION = 0x0112


def _rgb(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _truncated_jpeg(path):
  buf = io.BytesIO()
  Image.fromarray(_rgb(64, 64)).save(buf, 'JPEG')
  path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_report_names_skipped_files_and_truncated_jpegs_are_skipped(tmp_path):
  src = tmp_path / 'src'
  for cls in ('a', 'b'):
    os.makedirs(src / cls)
  for i in range(3):
    Image.fromarray(_rgb(16, 24, i)).save(src / 'a' / f'{i}.jpg')
  _truncated_jpeg(src / 'b' / 'cut.jpg')  # Opens and passes Image.verify(); decode fails.
  (src / 'b' / 'text.png').write_bytes(b'not an image')
  data_dir = str(tmp_path / 'tfds')
  report = import_folder.import_folder(str(src), 'ds', data_dir)
  assert (report.scanned, report.written, report.converted) == (5, 3, 0)
  assert [rel for rel, _ in report.skipped] == [os.path.join('b', 'cut.jpg'), 'b/text.png']
  assert 'truncated' in report.skipped[0][1]
  summary = report.summary(show=1)
  assert '3 images written' in summary and '2 of 5 files skipped' in summary
  assert 'cut.jpg' in summary and 'text.png' not in summary and '1 more' in summary
  assert len(records.open_split(data_dir, 'ds', 'train')) == 3


def test_nothing_importable_fails_and_writes_no_dataset(tmp_path):
  src = tmp_path / 'src'
  os.makedirs(src)
  _truncated_jpeg(src / 'cut.jpg')
  (src / 'text.png').write_bytes(b'not an image')
  data_dir = tmp_path / 'tfds'
  with pytest.raises(import_folder.NothingImportedError, match='none of the 2 files'):
    import_folder.import_folder(str(src), 'ds', str(data_dir))
  assert not records.is_prepared(str(data_dir), 'ds')
  assert not os.listdir(records.dataset_dir(str(data_dir), 'ds'))  # No empty shards either.
  # The command line exits non-zero with the reason, so a script stops before training.
  run = subprocess.run(
    [
      sys.executable,
      '-m',
      'triplane3d.data.import_folder',
      f'--src={src}',
      '--name=ds',
      f'--data_dir={data_dir}',
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode != 0 and 'none of the 2 files' in run.stderr and 'cut.jpg' in run.stderr


def test_images_over_the_pixel_cap_are_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
  src = tmp_path / 'src'
  os.makedirs(src)
  Image.fromarray(_rgb(20, 20)).save(src / 'small.png')  # 400 pixels.
  Image.fromarray(_rgb(40, 40)).save(src / 'big.png')  # Over the cap (PIL: a warning).
  Image.fromarray(_rgb(60, 60)).save(src / 'huge.png')  # Over twice the cap (PIL: an error).
  report = import_folder.import_folder(str(src), 'ds', str(tmp_path / 'tfds'))
  assert report.written == 1
  assert sorted(rel for rel, _ in report.skipped) == ['big.png', 'huge.png']
  assert all('MAX_IMAGE_PIXELS' in why and 'bomb' in why for _, why in report.skipped)


def test_odd_modes_are_stored_as_rgb_and_ordinary_files_byte_for_byte(tmp_path):
  src = tmp_path / 'src'
  os.makedirs(src)
  colours = np.repeat(np.repeat(np.array([[[255, 0, 0], [30, 200, 90]]], np.uint8), 16, 0), 16, 1)
  Image.fromarray(colours).convert('CMYK').save(src / 'cmyk.jpg', quality=95)
  rgba = np.concatenate([_rgb(8, 8), np.full((8, 8, 1), 255, np.uint8)], -1)
  rgba[:4, :, 3] = 0
  Image.fromarray(rgba, mode='RGBA').save(src / 'rgba.png')
  Image.fromarray(_rgb(8, 8)).convert('P').save(src / 'palette.png')
  Image.fromarray(np.tile(np.arange(0, 65536, 8192, dtype=np.uint16), (4, 1))).save(
    src / 'grey16.png'
  )
  exif = Image.Exif()
  exif[_EXIF_ORIENTATION] = 6
  Image.fromarray(_rgb(10, 30)).save(src / 'rotated.jpg', exif=exif)
  Image.fromarray(_rgb(12, 20)).save(src / 'plain.jpg')
  Image.fromarray(_rgb(12, 20)[..., 0]).save(src / 'grey.png')
  Image.fromarray(_rgb(6, 6)).save(src / 'other.bmp')
  plain = {'plain.jpg', 'grey.png'}

  data_dir = str(tmp_path / 'tfds')
  report = import_folder.import_folder(str(src), 'ds', data_dir)
  assert report.written == 8 and report.converted == 6 and not report.skipped
  raw = records.open_split(data_dir, 'ds', 'train')
  decoded = records.open_split(data_dir, 'ds', 'train', raw_images=False)  # tfds' decoder.
  for i in range(len(raw)):
    rel = raw[i]['file_name'].decode()
    stored = bytes(raw[i]['image'])
    if rel in plain:
      assert stored == (src / rel).read_bytes(), rel
    img = decoded[i]['image']
    want = np.asarray(images.open_rgb(src / rel))
    assert img.dtype == np.uint8 and img.shape == want.shape, (rel, img.shape, want.shape)
    if rel.endswith('.jpg'):  # Re-encoded at JPEG quality 95: close, not equal.
      assert np.abs(img.astype(int) - want).mean() < 3, rel
    else:
      np.testing.assert_array_equal(img, want, err_msg=rel)
  by_name = {raw[i]['file_name'].decode(): i for i in range(len(raw))}
  assert decoded[by_name['rotated.jpg']]['image'].shape == (30, 10, 3)
  np.testing.assert_array_equal(decoded[by_name['rgba.png']]['image'][:4], 255)  # White.
