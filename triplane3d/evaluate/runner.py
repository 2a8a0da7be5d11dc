"""The evaluation run: check everything, then backbone by backbone, suite by suite, resumably.

  1. suites (`suites.resolve`), backbone specs (`backbones.parse`) and every suite's datasets
     (`suite.check`) are checked first: a typo fails in seconds, not after hours of features;
  2. for each backbone, for each suite: the probe result is read from
     `<workdir>/probes/<label>/<suite>-<key>.json` if present (key: the suite's protocol and the
     keys of the feature files it reads); otherwise features come from the cache
     (`features.FeatureStore`, `<workdir>/features/`) or are extracted, the suite's probes run
     and the result is written;
  3. `report.write` writes results.json, results.md and the figures.

A run interrupted anywhere resumes from the last feature file or probe result written.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import numpy as np
from absl import logging

from triplane3d.evaluate import backbones as backbones_lib
from triplane3d.evaluate import datasets, features, report, suites

# Part of every probe result's key: bump when what a suite's evaluate() returns changes.
RESULTS_VERSION = 2


def _plain(x):
  """JSON-able copy: numpy scalars to Python, NaN to None (JSON has no NaN)."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return _plain(x.tolist())
  if isinstance(x, (np.floating, float)):
    return None if math.isnan(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, obj) -> None:
  """Writes `obj` as JSON atomically (temp file + rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(_plain(obj), f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _loader(backbone: backbones_lib.Backbone, config):
  def load():
    start = time.perf_counter()
    variant, params = backbone.load(seed=int(config.seed))
    logging.info('%s: %s loaded in %.1f s', backbone.label, variant, time.perf_counter() - start)
    return backbones_lib.create_model(variant, str(config.dtype)), params

  return load


class LazyFeatures(Mapping):
  """{set key: features} of a suite's sets, read from the cache files on first access and kept,
  except `streamed` sets (one epoch of augmented views each): those are read on every access
  and not kept, so memory holds what the suite holds."""

  def __init__(self, paths: dict, streamed=frozenset()):
    self.paths, self.streamed, self._kept = paths, set(streamed), {}

  def __getitem__(self, key: str) -> dict:
    if key in self._kept:
      return self._kept[key]
    feats = features.FeatureStore.load(self.paths[key])
    if key not in self.streamed:
      self._kept[key] = feats
    return feats

  def __iter__(self):
    return iter(self.paths)

  def __len__(self) -> int:
    return len(self.paths)

  def timing(self, key: str) -> tuple[float, float]:
    """(images/s, seconds) of the set's extraction, without reading its features."""
    t = features.FeatureStore.load(self.paths[key], ('images_per_s', 'seconds'))
    return float(t['images_per_s']), float(t['seconds'])


class Run:
  """One evaluation: `Run(config, workdir)` checks (step 1), `.execute()` does steps 2–3."""

  def __init__(self, config, workdir: str):
    if not workdir:
      raise ValueError('pass --workdir=OUT, the directory for results, figures and caches.')
    self.config, self.workdir = config, workdir
    self.suites = suites.resolve(config, workdir)
    self.backbones = backbones_lib.parse(
      config.backbones, train_config=str(config.train_config), seed=int(config.seed)
    )
    missing = []
    for suite in self.suites:  # Every missing dataset in one message, not one per attempt.
      try:
        suite.check()
      except datasets.DatasetMissingError as e:
        missing.append(f'- {suite.name}: {e}')
    if missing:
      raise datasets.DatasetMissingError(
        f'{len(missing)} suite(s) cannot find their data:\n' + '\n'.join(missing)
      )
    self.store = features.FeatureStore(os.path.join(workdir, 'features'))
    self.probe_log: list = []
    self.extractors: dict[str, features.Extractor] = {}

  def _suite(self, suite, backbone, extractor, context) -> dict:
    sets = suite.image_sets()
    paths = {k: self.store.path(backbone.label, v, backbone.identity, p) for k, v, p in sets}
    protocol = suite.protocol()
    files = sorted(os.path.basename(p) for p in paths.values())
    key = features.cache_key(RESULTS_VERSION, files, protocol)
    path = os.path.join(
      self.workdir, 'probes', features.safe(backbone.label), f'{suite.name}-{key}'
    )
    if os.path.exists(path + '.json'):
      with open(path + '.json') as f:
        result = json.load(f)
      if os.path.exists(path + '.npz'):
        with np.load(path + '.npz') as f:
          result['arrays'] = {k: f[k] for k in f.files}
      self.probe_log.append((backbone.label, suite.name, 'cached'))
      return result
    start = time.perf_counter()
    for _, v, p in sets:  # Extract what is missing; nothing is held in memory yet.
      self.store.ensure(backbone.label, backbone.identity, v, extractor, with_patches=p)
    feats = LazyFeatures(paths, {k for k, v, _ in sets if getattr(v, 'streamed', False)})
    timing = {
      k: {kk: float(x) for kk, x in zip(('images_per_s', 'extract_s'), feats.timing(k))}
      for k in paths
    }
    probe_start = time.perf_counter()
    result = suite.evaluate(feats, context)
    result['protocol'] = protocol
    result['timing'] = {
      'sets': timing,
      'probe_s': time.perf_counter() - probe_start,
      'total_s': time.perf_counter() - start,
    }
    arrays = result.pop('arrays', None)
    if arrays:
      features.save_npz(path + '.npz', arrays)
    write_json(path + '.json', result)  # Last: its presence marks the result complete.
    result = json.loads(json.dumps(_plain(result)))
    if arrays:
      result['arrays'] = arrays
    self.probe_log.append((backbone.label, suite.name, 'computed'))
    return result

  def execute(self) -> dict:
    """Runs every (backbone, suite) pair and writes the report; returns results.json's dict."""
    start = time.perf_counter()
    results = {}
    for backbone in self.backbones:
      extractor = features.Extractor(_loader(backbone, self.config), int(self.config.batch_size))
      self.extractors[backbone.label] = extractor
      context: dict = {}
      for suite in self.suites:
        logging.info('%s: suite %s', backbone.label, suite.name)
        context[suite.name] = self._suite(suite, backbone, extractor, context)
      results[backbone.label] = {
        name: {k: v for k, v in r.items() if k != 'arrays'} for name, r in context.items()
      }
    summary = {
      'config': self.config.to_dict(),
      'suites': [{'name': s.name, 'columns': [list(c) for c in s.columns]} for s in self.suites],
      'backbones': [
        {'label': b.label, 'spec': b.spec, 'kind': b.kind, 'identity': b.identity}
        for b in self.backbones
      ],
      'results': results,
      'cache': {
        'features': [list(x) for x in self.store.log],
        'probes': [list(x) for x in self.probe_log],
      },
      'wall_s': time.perf_counter() - start,
    }
    summary = _plain(summary)
    write_json(os.path.join(self.workdir, 'results.json'), summary)
    report.write(self.workdir, summary)
    return summary


def run(config, workdir: str) -> dict:
  """Checks, evaluates and reports (module docstring); returns results.json's dict."""
  return Run(config, workdir).execute()
