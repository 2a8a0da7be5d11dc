"""Input-pipeline throughput per host, and what one host of a v5e-8 slice needs.

  python benchmarks/data_throughput.py [--num_examples=256] [--steps=12] [--rounds=2]
      [--accelerator=v5e-8] [--mfu=0.4]

Writes three datasets to a temporary directory and times `triplane3d.data.pipeline.create`
on each, with 0 and 2 grain workers, the pixels in both wire formats (float32 as the pipeline
gives them; uint8 as the trainer moves them and converts on the devices), alternated over
`--rounds`:

  imagenet-like  the paper's data path: a TFDS ArrayRecord dataset of 500×375 JPEGs (quality
                 90, ~106 KB: ImageNet's mean file size; synthetic scenes upscaled, with noise
                 for a photo's entropy) joined with 16-bit PNG depth at 256×192 (what
                 `precompute_depth --max_side=256` stores); configs/vitb.py's data settings
                 (224² input, 256² targets, crop scale 0.08–1, percentile depth), batch 32
  synthetic      the synthetic-scenes source at the paper's sizes (256² PNG scenes)
  demo           configs/demo.py's data (112² scenes, 112² input, 32² targets), batch 16

For each it prints images/s per host and the process's CPU ms per image: with 0 workers the
cost of decoding and augmenting; with workers the consuming process's, waits included, and
beside it ("take") what taking the workers' batches costs it, waits excluded — what caps a
host's rate (`benchmark.pipeline_rate`); then the rate one host of `--accelerator` consumes when
its chips run the ViT-B/14 paper step at `--mfu` and at 100 % of their peak (`benchmark.
host_need`), the cores that decoding takes and the consuming process's headroom.
"""

import io
import statistics
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image

from triplane3d import benchmark
from triplane3d.configs import common, demo, vitb
from triplane3d.data import depth_format, pipeline, records, synthetic
from triplane3d.render.camera import Camera

_NUM = flags.DEFINE_integer('num_examples', 256, 'Examples in each benchmark dataset.')
_STEPS = flags.DEFINE_integer('steps', 12, 'Batches timed per run.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternated repetitions of every run.')
_ACCEL = flags.DEFINE_string('accelerator', 'v5e-8', 'The TPU slice whose one host is fed.')
_MFU = flags.DEFINE_float('mfu', 0.4, 'The MFU the needed rate assumes (also shown at 100 %).')

# ImageNet's mean JPEG is ~110 KB; Gaussian noise of this σ (8-bit levels) on the upscaled
# scenes gives ~106 KB at 500×375, quality 90.
_JPEG_SIZE, _JPEG_NOISE, _JPEG_QUALITY = (500, 375), 24.0, 90
_DEPTH_SIZE = (256, 192)


def write_imagenet_like(data_dir: str, n: int) -> float:
  """Writes the 'inet' / 'inet_depth' datasets; returns the mean JPEG size in bytes."""
  rng, camera = np.random.default_rng(0), Camera()
  imgs, deps = [], []
  for i in range(n):
    rgb, depth = synthetic.render(synthetic.sample_scene(i, 0), camera, 256)
    big = np.asarray(Image.fromarray(rgb).resize(_JPEG_SIZE, Image.Resampling.BICUBIC), np.float32)
    big = np.clip(big + rng.normal(0, _JPEG_NOISE, big.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format='JPEG', quality=_JPEG_QUALITY)
    name = f'img_{i:05d}.jpg'
    imgs.append({'image': buf.getvalue(), 'label': i % 5, 'file_name': name})
    d = Image.fromarray(depth.astype(np.float32)).resize(_DEPTH_SIZE, Image.Resampling.BILINEAR)
    deps.append(depth_format.encode(np.asarray(d), name))
  feats = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=5),
      'file_name': tfds.features.Text(),
    }
  )
  records.write_dataset(data_dir, 'inet', feats, {'train': [imgs]})
  records.write_dataset(data_dir, 'inet_depth', depth_format.features(), {'train': [deps]})
  return float(np.mean([len(r['image']) for r in imgs]))


def _settings(tmp: str) -> dict:
  paper = vitb.get_config()
  paper.data.data_dir, paper.data.name, paper.data.depth_name = tmp, 'inet', 'inet_depth'
  paper.depth.is_disparity = False  # The datasets above carry no depth_info.
  paper.train.batch_size = 32
  syn = common.get_base_config()
  syn.data.source, syn.data.data_dir, syn.data.num_synthetic = (
    'synthetic',
    f'{tmp}/s256',
    _NUM.value,
  )
  syn.depth.normalize, syn.train.batch_size = 'none', 32
  small = demo.get_config()
  small.data.data_dir, small.data.num_synthetic = f'{tmp}/s112', _NUM.value
  return {'imagenet-like': paper, 'synthetic': syn, 'demo': small}


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    size = write_imagenet_like(tmp, _NUM.value)
    print(f'imagenet-like dataset: {_NUM.value} JPEGs of {size / 1e3:.0f} KB in '
          f'{time.perf_counter() - start:.0f} s')  # fmt: skip
    for res in (112, 256):
      start = time.perf_counter()
      synthetic.ensure_dataset(f'{tmp}/s{res}', _NUM.value, 0, Camera(), res)
      dt = time.perf_counter() - start
      print(f'synthetic generator {res}x{res}: {_NUM.value / dt:8.1f} images/s (incl. writing)')
    settings = _settings(tmp)
    data = {name: pipeline.prepare(c) for name, c in settings.items()}
    runs = {}  # (setting, workers, pixels) → [pipeline_rate results]
    for _ in range(_ROUNDS.value):
      for name, c in settings.items():
        for workers in (0, 2):
          for pixels in ('float32', 'uint8'):
            c.data.num_workers = workers
            r = benchmark.pipeline_rate(
              c, data[name], _STEPS.value, float_pixels=pixels == 'float32'
            )
            runs.setdefault((name, workers, pixels), []).append(r)
  print(f'\n{"setting":<14} {"workers":>7} {"pixels":>7} {"images/s":>9} {"CPU ms/img":>10} '
        f'{"take ms/img":>11}')  # fmt: skip
  take = {}
  for (name, workers, pixels), rs in runs.items():
    rate = statistics.median(r['images_per_s'] for r in rs)
    ms = statistics.median(r['main_cpu_ms_per_image'] for r in rs)
    took = statistics.median(r.get('take_cpu_ms_per_image', ms) for r in rs)
    take[name, workers, pixels] = took
    shown = f'{took:11.3f}' if workers else f'{"":>11}'
    print(f'{name:<14} {workers:>7} {pixels:>7} {rate:9.1f} {ms:10.3f} {shown}')
  need = benchmark.host_need(settings['imagenet-like'], _ACCEL.value, _MFU.value)
  decode = take['imagenet-like', 0, 'uint8']
  print(
    f'\n{need["accelerator"]}, one host ({need["chips_per_host"]} chips, '
    f'{need["host_vcpus"] or "?"} vCPUs), ViT-B/14 paper step: '
    f'{need["images_per_s"]:.0f} images/s at {_MFU.value:.0%} MFU, '
    f'{need["images_per_s_at_100pct_mfu"]:.0f} at 100 %'
  )
  print(
    f'decoding (imagenet-like, uint8, {decode:.2f} CPU ms/img): '
    f'{need["images_per_s"] * decode / 1e3:.1f} cores at {_MFU.value:.0%} MFU, '
    f'{need["images_per_s_at_100pct_mfu"] * decode / 1e3:.1f} at 100 %'
  )
  for pixels in ('float32', 'uint8'):
    cap = 1e3 / take['imagenet-like', 2, pixels]
    print(
      f'consuming process, {pixels} pixels: at most {cap:.0f} images/s, '
      f'{cap / need["images_per_s"]:.1f}× the need at {_MFU.value:.0%} MFU, '
      f'{cap / need["images_per_s_at_100pct_mfu"]:.2f}× at 100 %'
    )


if __name__ == '__main__':
  app.run(main)
