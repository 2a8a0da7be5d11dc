"""The summary writer: TensorBoard events and metrics.jsonl, written without importing PyTorch
(tensorboardX imports it when installed, ~3 s of every training process's start)."""

import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent("""
  import json, struct, sys
  import numpy as np
  from triplane3d import summaries

  w = summaries.Writer(sys.argv[1])
  w.scalars(1, {'total': 0.5, 'psnr': 12.25})
  w.scalars(2, {'total': 0.25, 'psnr': 14.0})
  png = w.image(2, np.zeros((8, 12, 3), np.uint8))
  w.close()
  no_torch = 'torch' not in sys.modules

  from tensorboardX.proto import event_pb2  # Read the event file back: TFRecord framing.
  import pathlib
  (events,) = pathlib.Path(sys.argv[1], 'tb').glob('events.out.tfevents.*')
  data, got = events.read_bytes(), []
  while data:
    (n,) = struct.unpack('<Q', data[:8])
    e = event_pb2.Event.FromString(data[12:12 + n])
    data = data[12 + n + 4:]
    got += [(e.step, v.tag, round(v.simple_value, 4) if v.HasField('simple_value') else
             (v.image.width, v.image.height)) for v in e.summary.value]

  import torch  # Still importable afterwards (export, evaluation).
  print(json.dumps({'no_torch': no_torch, 'events': got, 'png': png, 'torch': torch.__name__}))
""")


def test_writer_writes_events_without_importing_torch(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-c', _CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json

  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['no_torch'] and out['torch'] == 'torch'
  assert sorted(map(tuple, out['events'])) == [
    (1, 'psnr', 12.25),
    (1, 'total', 0.5),
    (2, 'psnr', 14.0),
    (2, 'reconstructions', [12, 8]),
    (2, 'total', 0.25),
  ]
  assert out['png'].endswith('step_0000002.png')
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(ln) for ln in lines] == [
    {'step': 1, 'total': 0.5, 'psnr': 12.25},
    {'step': 2, 'total': 0.25, 'psnr': 14.0},
  ]
