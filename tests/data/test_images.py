"""images.open_rgb on real files written by PIL: high bit depths, EXIF orientation, alpha,
CMYK, truncation, and the training decode that uses it. Expected pixels come from numpy."""

import io

import numpy as np
import pytest
from PIL import Image

from triplane3d.data import depth_format, images, transforms

_EXIF_ORIENTATION = 0x0112


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _ramp16(h=4, w=300) -> np.ndarray:
  """(h, w) uint16 covering 0..65535, both ends included."""
  return np.tile(np.round(np.linspace(0, 65535, w)).astype(np.uint16), (h, 1))


def _expected8(v: np.ndarray) -> np.ndarray:
  return np.round(v.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def test_16bit_png_decodes_to_the_8bit_gradient(tmp_path):
  v = _ramp16()
  path = tmp_path / 'grey16.png'
  Image.fromarray(v).save(path)
  with Image.open(path) as im:
    assert im.mode in ('I;16', 'I')  # What PIL opens 16-bit PNGs as, depending on version.
  rgb = np.asarray(images.open_rgb(path))
  assert rgb.shape == (*v.shape, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb, np.repeat(_expected8(v)[..., None], 3, -1))
  assert images.open_rgb(path.read_bytes()).tobytes() == rgb.tobytes()  # Bytes or path.


def test_big_endian_16bit_and_32bit_int_tiffs(tmp_path):
  v = _ramp16()
  big = Image.frombytes('I;16B', (v.shape[1], v.shape[0]), v.astype('>u2').tobytes())
  big.save(tmp_path / 'be.tif')
  with Image.open(tmp_path / 'be.tif') as im:
    assert im.mode == 'I;16B'
  want = _expected8(v)
  np.testing.assert_array_equal(np.asarray(images.open_rgb(tmp_path / 'be.tif'))[..., 0], want)
  # 32-bit 'I' holding 16-bit values is read as 16-bit ...
  Image.fromarray(v.astype(np.int32)).save(tmp_path / 'i16.tif')
  with Image.open(tmp_path / 'i16.tif') as im:
    assert im.mode == 'I'
  np.testing.assert_array_equal(np.asarray(images.open_rgb(tmp_path / 'i16.tif'))[..., 0], want)
  # ... and one beyond 16 bits is stretched over its own range.
  wide = v.astype(np.int32) * 4 - 100000
  Image.fromarray(wide).save(tmp_path / 'i32.tif')
  got = np.asarray(images.open_rgb(tmp_path / 'i32.tif'))[..., 0]
  np.testing.assert_array_equal(got, want)  # Same ramp, other range: same 8-bit picture.


def test_float_images_in_unit_range_scale_by_255_others_stretch(tmp_path):
  f = np.tile(np.linspace(0.0, 1.0, 256, dtype=np.float32), (3, 1))
  Image.fromarray(f, mode='F').save(tmp_path / 'unit.tif')
  got = np.asarray(images.open_rgb(tmp_path / 'unit.tif'))[..., 0]
  np.testing.assert_array_equal(got, np.round(f.astype(np.float64) * 255).astype(np.uint8))
  half = f * 0.5  # In [0, 1]: kept as is, not stretched to full range.
  Image.fromarray(half, mode='F').save(tmp_path / 'half.tif')
  assert np.asarray(images.open_rgb(tmp_path / 'half.tif')).max() == 128
  Image.fromarray(f * 1000 - 7, mode='F').save(tmp_path / 'wide.tif')
  np.testing.assert_array_equal(np.asarray(images.open_rgb(tmp_path / 'wide.tif'))[..., 0], got)


def test_exif_orientation_is_applied(tmp_path):
  a = np.zeros((20, 40, 3), np.uint8)  # Stored landscape: left half red, right half blue.
  a[:, :20, 0] = 255
  a[:, 20:, 2] = 255
  exif = Image.Exif()
  exif[_EXIF_ORIENTATION] = 6  # "Rotate 90° clockwise to display."
  Image.fromarray(a).save(tmp_path / 'rot.jpg', exif=exif, quality=95)
  path = tmp_path / 'rot.jpg'
  for src in (path, path.read_bytes()):  # A file, and bytes as training reads them.
    rgb = np.asarray(images.open_rgb(src)).astype(int)
    assert rgb.shape == (40, 20, 3)  # Displayed portrait.
    # Turned clockwise, the stored left (red) half is on top.
    assert (rgb[:15, :, 0] > 200).all() and (rgb[:15, :, 2] < 60).all()
    assert (rgb[25:, :, 2] > 200).all() and (rgb[25:, :, 0] < 60).all()


def test_an_rgb_jpeg_from_bytes_decodes_to_its_pixels():
  a = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
  data = _encode(Image.fromarray(a), 'JPEG')
  img = images.open_rgb(data)
  with Image.open(io.BytesIO(data)) as ref:
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ref.convert('RGB')))
  assert img.mode == 'RGB' and img.size == (32, 24)
  assert img.format == 'JPEG'  # The decoded image itself, not `to_rgb`'s copy.


def _from_file_and_bytes(path):
  """`open_rgb` of a file, and of its bytes (as training reads them), as int arrays."""
  return [np.asarray(images.open_rgb(src)).astype(int) for src in (path, path.read_bytes())]


def test_transparent_pixels_take_the_background_colour(tmp_path):
  bg = np.asarray(images.BACKGROUND)
  a = np.zeros((2, 3, 4), np.uint8)
  a[..., 2] = 255  # Every pixel stores blue ...
  a[0, 0, 3], a[0, 1, 3], a[0, 2, 3] = 0, 255, 128  # ... transparent, opaque, half.
  a[1, :, 3] = 0
  Image.fromarray(a, mode='RGBA').save(tmp_path / 'rgba.png')
  for rgb in _from_file_and_bytes(tmp_path / 'rgba.png'):
    np.testing.assert_array_equal(rgb[0, 0], bg)
    np.testing.assert_array_equal(rgb[1], np.tile(bg, (3, 1)))
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 255])
    np.testing.assert_allclose(rgb[0, 2], (bg * 127 + np.array([0, 0, 255]) * 128) / 255, atol=1)

  la = np.stack([np.full((2, 2), 10, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], -1)
  Image.fromarray(la, mode='LA').save(tmp_path / 'la.png')
  for rgb in _from_file_and_bytes(tmp_path / 'la.png'):
    np.testing.assert_array_equal(rgb[0, 0], bg)
    np.testing.assert_array_equal(rgb[0, 1], [10, 10, 10])

  p = Image.new('P', (2, 1))
  p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
  p.putpixel((0, 0), 0)
  p.putpixel((1, 0), 1)
  p.save(tmp_path / 'p.png', transparency=0)  # Palette entry 0 (black) is transparent.
  for rgb in _from_file_and_bytes(tmp_path / 'p.png'):
    np.testing.assert_array_equal(rgb[0], [bg, [0, 255, 0]])

  # An RGB PNG with a transparent colour (tRNS): mode 'RGB', so only its info says so.
  c = np.zeros((1, 2, 3), np.uint8)
  c[0, 1] = [0, 255, 0]
  Image.fromarray(c).save(tmp_path / 'trns.png', transparency=(0, 0, 0))
  for rgb in _from_file_and_bytes(tmp_path / 'trns.png'):
    np.testing.assert_array_equal(rgb[0], [bg, [0, 255, 0]])


def test_cmyk_jpeg_decodes_to_its_rgb(tmp_path):
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [40, 160, 220]], np.uint8)
  a = np.repeat(np.repeat(colours[None], 16, 0), 16, 1)  # Flat 16×16 blocks, JPEG-friendly.
  Image.fromarray(a).convert('CMYK').save(tmp_path / 'cmyk.jpg', quality=95)
  with Image.open(tmp_path / 'cmyk.jpg') as im:
    assert im.mode == 'CMYK'
  rgb = np.asarray(images.open_rgb(tmp_path / 'cmyk.jpg'))
  assert rgb.shape == a.shape
  np.testing.assert_allclose(rgb[4:-4, 4:-4].astype(int), a[4:-4, 4:-4], atol=12)


def test_truncated_file_raises(tmp_path):
  data = _encode(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)), 'JPEG')
  with pytest.raises(OSError):
    images.open_rgb(data[: len(data) // 2])


def test_training_decode_scales_16bit_images():
  v = _ramp16(h=32, w=32)
  element = {
    'image': _encode(Image.fromarray(v), 'PNG'),
    **depth_format.encode(np.linspace(1, 2, 32 * 32, dtype=np.float32).reshape(32, 32), 'k'),
    'label': 0,
  }
  aug = transforms.DecodeAugment(
    img_size=32, resolution=32, crop_scale=(1, 1), crop_ratio=(1, 1), flip=False
  )
  out = aug.random_map(element, np.random.default_rng(0))
  want = _expected8(v).astype(np.float32) / 255.0
  np.testing.assert_allclose(out['rgb'][..., 1], want, atol=1 / 255 + 1e-6)
