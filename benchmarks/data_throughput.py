"""Input-pipeline throughput: the grain pipeline with 0 and 2 workers, and scene generation.

  python benchmarks/data_throughput.py [--num_examples=512] [--steps=30]

Writes synthetic-scenes datasets to a temporary directory, then measures images/s of
`triplane3d.data.pipeline.create` at two settings — the paper's (224² backbone input, 256²
targets, from 256² images) and the demo's (112², 32², from 112² images) — and of the synthetic
generator. Numbers are per host, after a warm-up batch; CPU-bound (PNG decode, PIL resizes).
"""

import tempfile
import time

from absl import app, flags

from triplane3d import benchmark
from triplane3d.configs import common
from triplane3d.data import pipeline, synthetic
from triplane3d.render.camera import Camera

_NUM = flags.DEFINE_integer('num_examples', 512, 'Scenes in each benchmark dataset.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Batches timed per setting.')


def _config(data_dir, img_size, resolution, workers, batch_size):
  c = common.get_base_config()
  c.data.source, c.data.data_dir, c.data.num_synthetic = 'synthetic', data_dir, _NUM.value
  c.data.num_workers, c.depth.normalize = workers, 'none'
  c.model.img_size, c.render.resolution, c.train.batch_size = img_size, resolution, batch_size
  return c


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    for res in (112, 256):
      start = time.perf_counter()
      synthetic.ensure_dataset(f'{tmp}/r{res}', _NUM.value, 0, Camera(), res)
      dt = time.perf_counter() - start
      print(f'synthetic generator {res}x{res}: {_NUM.value / dt:8.1f} images/s (incl. writing)')
    for name, res, s, r, b in (
      ('paper 224/256', 256, 224, 256, 32),
      ('demo 112/32', 112, 112, 32, 16),
    ):
      for workers in (0, 2):
        c = _config(f'{tmp}/r{res}', s, r, workers, b)
        rate = benchmark.pipeline_rate(c, pipeline.prepare(c), _STEPS.value)
        print(f'pipeline {name:>14}, {workers} workers: {rate:8.1f} images/s')


if __name__ == '__main__':
  app.run(main)
