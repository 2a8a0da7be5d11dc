"""records: rewriting a split with another shard count (a re-import of a grown or shrunk folder)
replaces the old shard files instead of leaving a split that can never be finalised."""

import os

import numpy as np
import tensorflow_datasets as tfds

from triplane3d.data import records


def test_rewrite_with_another_shard_count_replaces_the_old_files(tmp_path):
  feats = tfds.features.FeaturesDict({'x': tfds.features.Scalar(dtype=np.int64)})
  d = str(tmp_path)
  records.write_dataset(d, 'nums', feats, {'train': [[{'x': 0}, {'x': 1}], [{'x': 2}]]})
  records.write_dataset(d, 'nums', feats, {'train': [[{'x': 5}]], 'test': [[{'x': 7}]] * 2})
  src = records.open_split(d, 'nums', 'train')
  assert len(src) == 1 and src[0]['x'] == 5
  assert len(records.open_split(d, 'nums', 'test')) == 2  # Other splits are left alone.
  assert not [
    f for f in os.listdir(records.dataset_dir(d, 'nums')) if '-of-00002' in f and 'train' in f
  ]
