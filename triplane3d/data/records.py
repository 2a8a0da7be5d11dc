"""Writing and opening TFDS ArrayRecord datasets without TensorFlow, shard by shard, in order.

Every dataset this package writes (folder imports, synthetic scenes, precomputed depth) goes
through here, so they all share one layout, `DATA_DIR/NAME/1.0.0/NAME-SPLIT.array_record-0000i
-of-0000n` plus `features.json` / `dataset_info.json`, and open with `tfds.data_source(NAME,
data_dir=DATA_DIR)` like any TFDS dataset. Records keep the order they were generated in (no
TFDS shuffling): a depth dataset is aligned with its image dataset record by record.

Shards are written to a temporary name and renamed when complete, so an interrupted job leaves
only whole shards and a restart can skip them (`shard_done`). A split has one shard count:
writing shard i of n removes the split's files of any other count (left by an earlier write of
the split with another count, e.g. a re-import of a grown or shrunk folder), which would
otherwise make the split unreadable. The metadata is written last
(`finalize`); a dataset without it is not readable, hence never half-read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

VERSION = '1.0.0'


def dataset_dir(data_dir: str, name: str) -> str:
  """The directory holding a dataset's files and metadata."""
  return os.path.join(data_dir, name, VERSION)


def _template(data_dir: str, name: str, split: str) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(
    data_dir=dataset_dir(data_dir, name),
    dataset_name=name,
    split=split,
    filetype_suffix='array_record',
  )


def shard_path(data_dir: str, name: str, split: str, shard: int, num_shards: int) -> str:
  return os.fspath(
    _template(data_dir, name, split).sharded_filepath(shard_index=shard, num_shards=num_shards)
  )


def shard_done(data_dir: str, name: str, split: str, shard: int, num_shards: int) -> bool:
  return os.path.exists(shard_path(data_dir, name, split, shard, num_shards))


def remove_other_shardings(data_dir: str, name: str, split: str, num_shards: int) -> list[str]:
  """Deletes the split's shard files (and their sidecars) of a count other than `num_shards`."""
  d = dataset_dir(data_dir, name)
  pattern = re.compile(re.escape(f'{name}-{split}.array_record-') + r'\d+-of-(\d+)(\..*)?$')
  removed = []
  for f in sorted(os.listdir(d)) if os.path.isdir(d) else ():
    m = pattern.match(f)
    if m and int(m.group(1)) != num_shards:
      try:
        os.remove(os.path.join(d, f))
        removed.append(f)
      except FileNotFoundError:  # Another writer of the split removed it first.
        pass
  return removed


def is_prepared(data_dir: str, name: str) -> bool:
  """Whether a dataset's metadata exists (it is written only once every shard is complete)."""
  return os.path.exists(os.path.join(dataset_dir(data_dir, name), 'dataset_info.json'))


def write_shard(
  data_dir: str,
  name: str,
  split: str,
  features: tfds.features.FeaturesDict,
  examples: Iterable[Mapping],
  shard: int,
  num_shards: int,
) -> int:
  """Serialises `examples` into one shard file, atomically. Returns the number of records."""
  path = shard_path(data_dir, name, split, shard, num_shards)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  remove_other_shardings(data_dir, name, split, num_shards)
  tmp = f'{path}.tmp-{os.getpid()}'
  # group_size:1 makes random access read one record, not a group of 65536 (grain's advice).
  writer = ArrayRecordWriter(tmp, 'group_size:1')
  count = 0
  try:
    for example in examples:
      writer.write(features.serialize_example(example))
      count += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return count


def _split_shards(data_dir: str, name: str) -> dict[str, int]:
  """split → number of shards, from the shard files present (temporary files ignored)."""
  pattern = re.compile(re.escape(name) + r'-(.+)\.array_record-(\d+)-of-(\d+)$')
  found: dict[str, tuple[int, set]] = {}
  d = dataset_dir(data_dir, name)
  for f in os.listdir(d) if os.path.isdir(d) else ():
    m = pattern.match(f)
    if m:
      n, seen = found.setdefault(m.group(1), (int(m.group(3)), set()))
      if int(m.group(3)) != n:
        raise ValueError(f'{d}: split {m.group(1)!r} has shards of different totals.')
      seen.add(int(m.group(2)))
  for split, (n, seen) in found.items():
    if len(seen) != n:
      missing = sorted(set(range(n)) - seen)
      raise FileNotFoundError(f'{name}/{split}: shards {missing[:10]} of {n} are missing in {d}.')
  return {split: n for split, (n, _) in found.items()}


def finalize(
  data_dir: str, name: str, features: tfds.features.FeaturesDict, description: str = ''
) -> None:
  """Writes the TFDS metadata for every split whose shard files are all present.

  Splits are discovered from the files, so datasets written split by split (or shard by
  shard on several machines) get complete metadata from whichever run finishes last.
  """
  split_infos = []
  for split, n in sorted(_split_shards(data_dir, name).items()):
    paths = [shard_path(data_dir, name, split, i, n) for i in range(n)]
    lengths = []
    for path in paths:
      reader = ArrayRecordReader(path)
      lengths.append(reader.num_records())
      reader.close()
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=lengths,
        num_bytes=sum(os.path.getsize(p) for p in paths),
        filename_template=_template(data_dir, name, split),
      )
    )
  # check_data=False: the check reads the data back through tf.data (TensorFlow).
  tfds.folder_dataset.write_metadata(
    data_dir=dataset_dir(data_dir, name),
    features=features,
    split_infos=split_infos,
    check_data=False,
    description=description,
  )


def write_dataset(
  data_dir: str,
  name: str,
  features: tfds.features.FeaturesDict,
  splits: Mapping[str, Sequence[Iterable[Mapping]]],
  description: str = '',
) -> None:
  """Writes a whole dataset: `splits[split]` is a sequence of shards, each an example iterable."""
  for split, shards in splits.items():
    for i, shard in enumerate(shards):
      write_shard(data_dir, name, split, features, shard, i, len(shards))
  finalize(data_dir, name, features, description)


class DatasetMissingError(FileNotFoundError):
  """A dataset the run needs is not in its data_dir."""


def open_split(data_dir: str, name: str, split: str, raw_images: bool = True, make: str = ''):
  """A random-access TFDS data source over one split (records as dicts of numpy / bytes).

  Args:
    data_dir: TFDS data dir ('' for the TFDS default).
    raw_images: leave image features as encoded bytes, so decoding happens in the grain
      workers (and a corrupt image can be skipped there instead of failing the read).
    make: how to make the dataset, for the error when it is missing.

  Raises:
    DatasetMissingError: no prepared dataset `name` in `data_dir` (instead of TFDS's
      DatasetNotFoundError listing its whole catalogue).
    ValueError: the split has no records.
  """
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    prepared = builder.is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    prepared = False
  if not prepared:
    raise DatasetMissingError(
      f'dataset {name!r} not found in data_dir {where}. '
      + (make or 'Check data.name / data.data_dir.')
    )
  info = builder.info.splits
  if split in info and info[split].num_examples == 0:
    raise ValueError(
      f'split {split!r} of {name!r} has no records (data_dir {where}): nothing to train or '
      'evaluate on. Re-import or rebuild it with images, or choose another split / data.name.'
    )
  decoders = None
  if raw_images:
    decoders = {
      k: tfds.decode.SkipDecoding()
      for k, f in builder.info.features.items()
      if isinstance(f, tfds.features.Image)
    }
  return builder.as_data_source(split, decoders=decoders or None)
