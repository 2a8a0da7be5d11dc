"""Decoding any image file PIL reads into the 8-bit RGB picture its author meant.

`open_rgb` is the one decoder for dataset images (training transforms, depth precompute,
folder import), so every reader sees the same pixels. `Image.open(...).convert('RGB')` alone
gets several common files wrong:

- 16-bit greyscale (PIL modes 'I;16*', 'I') is clipped to 255 by PIL, so it decodes almost
  white. Here 16-bit values v become round(v / 257) (65535 → 255). Mode 'I' (PIL's 32-bit
  integer mode, which is also how 16-bit PNGs open in some PIL versions) is read as 16-bit when
  every value lies in [0, 65535], else its own min..max is stretched to 0..255.
- Float images (mode 'F') are read as [0, 1] when every finite value lies there, else their
  own min..max is stretched to 0..255; NaN becomes 0.
- Transparent pixels (RGBA, LA, PA, P or L with a transparency key) are composited over
  BACKGROUND (white: object photos and renders cut out of their background are usually shown
  on white), instead of keeping whatever colour the invisible pixels happen to store.
- The EXIF orientation tag is applied, so a portrait phone JPEG is portrait.
- CMYK, palette, 1-bit and other modes are converted to RGB.

The whole file is decoded before returning, so truncated or corrupt files raise here rather
than later in the pipeline.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # Colour transparent pixels are composited over.

_16_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')


def _stretch(a: np.ndarray) -> np.ndarray:
  """Maps a's own finite min..max onto 0..255 (a constant image maps to 0)."""
  finite = np.isfinite(a)
  if not finite.any():
    return np.zeros(a.shape, np.uint8)
  lo, hi = float(a[finite].min()), float(a[finite].max())
  scaled = (np.where(finite, a, lo) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
  return np.round(scaled).astype(np.uint8)


def _to_8bit_grey(img: Image.Image) -> Image.Image:
  """Mode 'L' from a high-bit-depth greyscale image ('I;16*', 'I', 'F'); see the module doc."""
  a = np.asarray(img)
  if img.mode == 'F':
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if finite.any() and a[finite].min() >= 0.0 and a[finite].max() <= 1.0:
      q = np.round(np.where(finite, a, 0.0) * 255.0).astype(np.uint8)
    else:
      q = _stretch(a)
  else:
    a = a.astype(np.int64)
    if img.mode in _16_BIT or (a.size and a.min() >= 0 and a.max() <= 65535):
      # (v + 128) // 257 is round(v / 257) for v >= 0 (v / 257 is never exactly x.5).
      q = ((a + 128) // 257).astype(np.uint8)
    else:
      q = _stretch(a.astype(np.float64))
  return Image.fromarray(q, mode='L')


_ORIENTATION = 0x0112  # The EXIF Orientation tag.


def _has_alpha(img: Image.Image) -> bool:
  return img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info


def to_rgb(img: Image.Image) -> Image.Image:
  """An opened image as mode 'RGB' (EXIF orientation applied, alpha over BACKGROUND)."""
  img.load()  # Full decode first: truncated files raise here.
  img = ImageOps.exif_transpose(img)
  if img.mode in _16_BIT or img.mode in ('I', 'F'):
    img = _to_8bit_grey(img)
  if _has_alpha(img):
    rgba = img.convert('RGBA')
    out = Image.new('RGB', rgba.size, BACKGROUND)
    out.paste(rgba, mask=rgba.getchannel('A'))
    return out
  return img if img.mode == 'RGB' else img.convert('RGB')


def open_rgb(data: bytes | str | os.PathLike) -> Image.Image:
  """Decodes encoded image bytes, or the file at a path, to a fully loaded mode-'RGB' image.

  Raises whatever PIL raises for unreadable, truncated or over-large files
  (`Image.DecompressionBombError` past twice `Image.MAX_IMAGE_PIXELS`).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    with Image.open(data) as img:
      return to_rgb(img)
  # From bytes no file is held open, so nothing needs closing, and an image that is already
  # what `to_rgb` makes is returned as it is, without its copy (0.2 ms per ImageNet-sized
  # JPEG, in every training example).
  img = Image.open(io.BytesIO(bytes(data)))
  img.load()  # Full decode first: truncated files raise here.
  if img.mode == 'RGB' and not _has_alpha(img) and img.getexif().get(_ORIENTATION, 1) == 1:
    return img
  return to_rgb(img)
