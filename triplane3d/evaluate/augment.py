"""DINOv2's linear-probe training augmentation, as image sets: one set of views per epoch.

`AugmentedViews(base, epoch, seed)` is a `features.ImageSet` whose image i is
RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) followed by a horizontal flip
with probability 0.5 (`make_classification_train_transform` of dinov2/data/transforms.py, with
torchvision's sampling: 10 tries, else the central crop clamped to the ratio range) of the base
set's image i, drawn from `np.random.default_rng([seed, epoch, i])`: a view depends only on
(seed, epoch, image), never on the batch or the order of extraction. Sources are the base set's
decoded images (`base.raw(start, stop)`, full resolution) when it has them, else its S×S images
(synthetic scenes are rendered at the evaluation size). Shapes: images (B, S, S, 3) uint8; the
meta (labels) is the base set's. Its features are cached like any set's (`identity` adds the
epoch, seed and transform) and marked `streamed`: the runner reads them one epoch at a time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from triplane3d.data import transforms

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRANSFORM = 'RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) + hflip(0.5)'


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of torchvision's RandomResizedCrop.get_params, with
  the training pipeline's sampler (`transforms.random_resized_crop_box`) at DINOv2's scale and
  ratio."""
  left, top, right, bottom = transforms.random_resized_crop_box(rng, height, width, SCALE, RATIO)
  return top, left, bottom - top, right - left


def view(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """One augmented view (size, size, 3) uint8 of a PIL RGB image."""
  top, left, h, w = crop_box(*img.size, rng)
  out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
  if rng.random() < 0.5:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out.convert('RGB'), np.uint8)


@dataclasses.dataclass
class AugmentedViews:
  """Epoch `epoch`'s augmented views of every image of `base` (module docstring)."""

  base: object
  epoch: int
  seed: int = 0
  streamed = True  # The runner loads these features on demand and does not keep them.

  def __post_init__(self):
    self.name = f'{self.base.name}_aug{self.epoch}'
    self.img_size = int(self.base.img_size)

  @property
  def identity(self) -> dict:
    aug = {'epoch': self.epoch, 'seed': self.seed, 'transform': TRANSFORM}
    return {**self.base.identity, 'augment': aug}

  def __len__(self) -> int:
    return len(self.base)

  def meta(self) -> dict[str, np.ndarray]:
    return self.base.meta()

  def _sources(self, start: int, stop: int) -> list[Image.Image]:
    if hasattr(self.base, 'raw'):
      return self.base.raw(start, stop)
    return [Image.fromarray(a) for a in self.base.images(start, stop)]

  def images(self, start: int, stop: int) -> np.ndarray:
    views = [
      view(img, self.img_size, np.random.default_rng([self.seed, self.epoch, start + i]))
      for i, img in enumerate(self._sources(start, stop))
    ]
    return np.stack(views)
