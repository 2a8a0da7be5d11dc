"""Frozen-backbone features of an image set, extracted once and cached on disk.

For every image (N of them, S×S, P = (S/14)² patches, D the backbone width):

  cls         (N, 4, D) float32  normed class tokens of the last 4 blocks (DINOv2's linear
                                 probe features; the last one is `x_norm_clstoken`)
  patch_mean  (N, D)    float32  mean of the last block's normed patch tokens (the "avgpool")

and, for sets that feed a depth probe (`with_patches`), DINOv2's depth-probe features:

  patches     (N, P, K·D) float16  patch tokens of K = 4 blocks spread over the depth
                                   (`depth_blocks`), WITHOUT the final norm, concatenated
  patch_cls   (N, K·D)    float32  the class tokens of the same blocks (the probe concatenates
                                   them to every patch)

An image set (`ImageSet`) has a name, an `identity` (what determines its pixels and labels,
preprocessing included), `len()`, `meta()` (per-image labels etc., stored beside the features
so a cached set needs no dataset access) and `images(start, stop)`: uint8 (B, S, S, 3).

Cache: `<root>/<backbone label>/<set name>-<key>.npz`, key = hash of (backbone identity, set
identity, feature spec), written atomically. A file whose key matches is reused, never
recomputed; anything else that changed gets a new key and a new file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from triplane3d.data.transforms import IMAGENET_MEAN, IMAGENET_STD

VERSION = 1  # Bump when what is stored changes: every cached file is then recomputed.
NUM_LAST = 4  # Class tokens of the last 4 blocks (DINOv2 linear probe, n_last_blocks=4).
VARIANTS = ('cls1', 'cls1+avgpool', 'cls4', 'cls4+avgpool')  # `variants()` keys, in order.


class ImageSet(Protocol):
  name: str

  @property
  def identity(self) -> dict: ...

  def __len__(self) -> int: ...

  def meta(self) -> dict[str, np.ndarray]: ...

  def images(self, start: int, stop: int) -> np.ndarray: ...


def depth_blocks(depth: int) -> tuple[int, ...]:
  """DINOv2's depth-probe blocks: [2, 5, 8, 11] (12 blocks), [4, 11, 17, 23] (24), [9, 19, 29,
  39] (40); other depths evenly spaced the same way (4 blocks: all of them)."""
  if depth == 24:
    return (4, 11, 17, 23)
  return tuple(int((i + 1) * depth / 4) - 1 for i in range(4))


def safe(label: str) -> str:
  return re.sub(r'[^\w.@+-]', '_', label)


def cache_key(*parts) -> str:
  """A short stable hash of JSON-able parts."""
  text = json.dumps([VERSION, *parts], sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=32)
def _feature_fn(model, with_patches: bool) -> Callable:
  """The jitted feature function of one architecture (a flax module compares by its fields):
  shared by every backbone of that architecture, so an evaluation of several checkpoints of
  one model traces and compiles it once per image shape, not once per backbone."""
  blocks = depth_blocks(model.depth)

  def fn(params, images_u8):
    x = (images_u8.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    apply = lambda **kw: model.apply(  # noqa: E731
      {'params': params}, x, return_class_token=True, method='get_intermediate_layers', **kw
    )
    last = apply(n=NUM_LAST, norm=True)
    out = {
      'cls': jnp.stack([c for _, c in last], axis=1).astype(jnp.float32),
      'patch_mean': last[-1][0].mean(axis=1).astype(jnp.float32),
    }
    if with_patches:
      raw = apply(n=list(blocks), norm=False)
      out['patches'] = jnp.concatenate([p for p, _ in raw], -1).astype(jnp.float16)
      out['patch_cls'] = jnp.concatenate([c for _, c in raw], -1).astype(jnp.float32)
    return out

  return jax.jit(fn)


@dataclasses.dataclass
class Extractor:
  """One backbone's weights, loaded lazily, and its architecture's jitted feature function
  (`_feature_fn`, shared with every backbone of that architecture) for its image sets."""

  load: Callable[[], tuple[object, dict]]  # () -> (DinoViT, params), called at most once.
  batch_size: int = 64
  _model: object = None
  _params: dict | None = None
  calls: int = 0  # Image sets extracted (not read from the cache): for tests and reports.

  def _fn(self, with_patches: bool):
    if self._model is None:
      self._model, params = self.load()
      self._params = jax.device_put(params)
    return _feature_fn(self._model, with_patches)

  def __call__(self, image_set: ImageSet, with_patches: bool, desc: str) -> dict:
    """Features of every image of the set (module docstring), plus 'images_per_s'."""
    fn = self._fn(with_patches)
    self.calls += 1
    n, bs = len(image_set), self.batch_size
    chunks: dict[str, list] = {}
    start = time.perf_counter()
    steady = None  # Time after the first batch: compilation excluded from the rate.
    with tqdm(total=n, desc=desc, unit='img', leave=True) as bar:
      for i in range(0, n, bs):
        batch = image_set.images(i, min(n, i + bs))
        real = len(batch)
        if real < bs:  # Pad to one shape: one compilation per set.
          batch = np.concatenate([batch, np.zeros((bs - real, *batch.shape[1:]), batch.dtype)])
        out = jax.device_get(fn(self._params, batch))
        for k, v in out.items():
          chunks.setdefault(k, []).append(np.asarray(v)[:real])
        if steady is None:
          steady = (time.perf_counter(), real)
        bar.update(real)
    end = time.perf_counter()
    feats = {k: np.concatenate(v) for k, v in chunks.items()}
    timed = n - steady[1]
    rate = timed / (end - steady[0]) if timed else n / (end - start)
    feats['images_per_s'] = np.float64(rate)
    feats['seconds'] = np.float64(end - start)
    return feats


def save_npz(path: str, arrays: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp.npz')
  os.close(fd)
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@dataclasses.dataclass
class FeatureStore:
  """The cache under `root` (module docstring); `get` returns features + meta of one set."""

  root: str
  log: list = dataclasses.field(default_factory=list)  # (label, set, 'cached'|'extracted').

  def path(self, label: str, image_set: ImageSet, backbone_identity: dict, with_patches: bool):
    key = cache_key(backbone_identity, image_set.identity, {'patches': with_patches})
    return os.path.join(self.root, safe(label), f'{image_set.name}-{key}.npz')

  def ensure(
    self,
    label: str,
    backbone_identity: dict,
    image_set: ImageSet,
    extractor: Extractor,
    *,
    with_patches: bool = False,
  ) -> str:
    """The set's cache file, extracted (and written) first if missing."""
    path = self.path(label, image_set, backbone_identity, with_patches)
    if os.path.exists(path):
      self.log.append((label, image_set.name, 'cached'))
      return path
    # Meta first: a generated set renders here, before the extraction's progress bar opens.
    meta = {f'meta_{k}': v for k, v in image_set.meta().items()}
    feats = extractor(image_set, with_patches, desc=f'{label} {image_set.name}')
    save_npz(path, {**feats, **meta})
    self.log.append((label, image_set.name, 'extracted'))
    return path

  @staticmethod
  def load(path: str, keys=None) -> dict[str, np.ndarray]:
    """The arrays of a cache file (only `keys` when given: an npz reads members on demand)."""
    with np.load(path) as f:
      return {k: f[k] for k in (f.files if keys is None else keys)}

  def get(self, label, backbone_identity, image_set, extractor, *, with_patches=False) -> dict:
    """Features + meta of one set (module docstring), extracted if not cached."""
    path = self.ensure(label, backbone_identity, image_set, extractor, with_patches=with_patches)
    return self.load(path)


def variants(feats: dict) -> dict[str, np.ndarray]:
  """The linear probe's feature variants (DINOv2): {last 1, last 4} class tokens × {without,
  with} the mean patch token, each (N, D_v) float32."""
  cls = feats['cls']
  last1, last4 = cls[:, -1], cls.reshape(len(cls), -1)
  pool = feats['patch_mean']
  return {
    'cls1': last1,
    'cls1+avgpool': np.concatenate([last1, pool], axis=1),
    'cls4': last4,
    'cls4+avgpool': np.concatenate([last4, pool], axis=1),
  }
