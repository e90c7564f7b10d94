"""TensorFlow Datasets sources (`cifar10`, `imagenet2012`, ...), failing fast when offline.

An unprepared data set is only downloaded when config.data.download is on and the tfds storage
host answers a 3 s connect; otherwise a UserError says how to prepare it. (Left to itself, an
offline tfds download retries for minutes.) Each process reads its own `tfds.even_splits`
shard. With config.data.cache the shard is read into memory once and indexed like the other
in-memory sources; without it, examples stream through a seeded tf.data shuffle (see
`Stream.train_examples` for the cost of resuming).
"""

import dataclasses
import difflib
import os
import re
import socket
import time

import numpy as np
from vit_jax.data.tensorflow_import import tf, tfds

from vit_jax.data import augment
from vit_jax.data import table as table_lib
from vit_jax.errors import EnvironmentFault, UserError

TFDS_STORAGE_ADDRESS = ('storage.googleapis.com', 443)  # where tfds downloads from


def tfds_host_reachable(timeout_s=3.0):
  """Whether the tfds storage host accepts a TCP connection within `timeout_s`."""
  try:
    with socket.create_connection(TFDS_STORAGE_ADDRESS, timeout=timeout_s):
      return True
  except OSError:
    return False


@dataclasses.dataclass
class Stream:
  """One split of a prepared tfds builder, read as a tf.data pipeline (not held in memory)."""
  builder: object
  split: str              # the whole split, e.g. 'train[:98%]'
  image_key: str
  label_key: str
  num_examples: int       # in the whole split
  shuffle_buffer: int
  process_count: int

  def _shard(self, process_index, decode_images=False):
    """tf.data of (payload, label) over this process's even shard, in file order."""
    shard = tfds.even_splits(self.split, n=self.process_count)[process_index]
    decoders = None if decode_images else {self.image_key: tfds.decode.SkipDecoding()}
    dataset = self.builder.as_dataset(
        split=shard, shuffle_files=False, decoders=decoders,
        read_config=tfds.ReadConfig(try_autocache=False))
    image_key, label_key = self.image_key, self.label_key
    return dataset.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

  def decode(self, payload):
    """An encoded image of this split -> uint8 (H, W, 3)."""
    return augment.decode(payload)

  def train_examples(self, seed, start_step, local_batch, global_batch, process_index):
    """Infinite tf.data of (encoded image, label, global stream position) from start_step on.

    The shuffle is seeded, so the order is fixed by (seed, process layout); resuming skips
    start_step * local_batch records, which are read from disk but never decoded.
    """
    dataset = self._shard(process_index)
    dataset = dataset.shuffle(self.shuffle_buffer, seed=seed % 2**63,
                              reshuffle_each_iteration=True).repeat()
    first = start_step * local_batch
    dataset = dataset.skip(first).enumerate(start=first)

    def with_position(count, example):
      step, offset = count // local_batch, count % local_batch
      position = step * global_batch + process_index * local_batch + offset
      return example[0], example[1], tf.cast(position, tf.int64)

    return dataset.map(with_position)

  def read_fault(self, error):
    """The one-line EnvironmentFault for a tf.data error while reading this split, naming the
    shard: TensorFlow names a missing or unreadable file itself; for a corrupt record it does
    not, and the split's shards are checked one by one (for at most SHARD_CHECK_S) to find it."""
    detail = re.sub(r'\{\{.*?\}\}|\[Op:\w+\].*', '', str(error)).strip().splitlines()
    detail = detail[0] if detail else type(error).__name__
    named = re.search(r'(\S*tfrecord\S*?)[;:,]?(\s|$)', detail)
    shard = named.group(1) if named else _corrupt_shard(self._files())
    where = (f'shard {shard}' if shard else
             f'one of the {len(self._files())} shards in {self.builder.data_dir}')
    return EnvironmentFault(
        f'cannot read tfds data set {self.builder.name!r} split {self.split!r}: {where} '
        f'({detail}); re-prepare it (`tfds build {self.builder.name} '
        f'--data_dir={self.builder.data_dir_root}`) or restore the file')

  def _files(self):
    base = self.split.split('[')[0]
    try:
      return [os.fspath(f) for f in self.builder.info.splits[base].filepaths]
    except Exception:  # pylint: disable=broad-except  # no split metadata (mock data)
      return []

  def eval_examples(self, process_index, process_count):
    """tf.data of (encoded image, label) over this process's shard, once, in file order."""
    del process_count  # fixed when the stream was built
    return self._shard(process_index)

  def num_eval_batches(self, local_batch, process_count, max_examples=None):
    """Batches of `local_batch` that cover the largest process's shard (of its first
    `max_examples` / process_count, when given): every process runs that many."""
    largest_shard = -(-self.num_examples // process_count)
    if max_examples is not None:  # Each process reads the first of its shard.
      largest_shard = min(largest_shard, -(-max_examples // process_count))
    return -(-largest_shard // local_batch)


SHARD_CHECK_S = 30


def _corrupt_shard(paths):
  """The first of `paths` whose records do not all read, within SHARD_CHECK_S; else None."""
  deadline = time.monotonic() + SHARD_CHECK_S
  for path in paths:
    if time.monotonic() > deadline:
      return None
    try:
      for _ in tf.data.TFRecordDataset(path).as_numpy_iterator():
        pass
    except tf.errors.OpError:
      return path
  return None


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A tfds data set's train and eval sources for this process, and its class names."""
  train: object  # Stream or table.Table
  eval: object
  class_names: list


def _builder(name, data_dir):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split(':')[0].split('/')[0], known, n=3)
    hint = f'; did you mean {", ".join(close)}?' if close else ''
    raise UserError(f'tfds has no data set {name!r}{hint}') from None


def _prepare(builder, config):
  """Makes sure `builder` is prepared, downloading only when allowed and online."""
  if builder.is_prepared():
    return
  name = config.data.name
  how = (f'prepare it where there is network (`tfds build {name} --data_dir=DIR`, or '
         f'tfds.builder({name!r}, data_dir=DIR).download_and_prepare()) and set '
         'config.data.data_dir=DIR')
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    how += (f'; {name} needs files downloaded by hand into '
            f'{os.path.join(builder.data_dir_root, "downloads", "manual")}')
  if not config.data.download:
    raise UserError(f'tfds data set {name!r} is not prepared in data_dir '
                    f'{builder.data_dir_root} and config.data.download=False; {how}')
  if not tfds_host_reachable():
    raise UserError(f'tfds data set {name!r} is not prepared in data_dir '
                    f'{builder.data_dir_root} and {TFDS_STORAGE_ADDRESS[0]} is unreachable '
                    f'(offline?); {how}')
  try:
    builder.download_and_prepare()
  except Exception as error:  # pylint: disable=broad-except  # network/manual-file failures
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
    raise UserError(f'could not prepare tfds data set {name!r}: {first_line}; {how}') from error


def _check_split(builder, split, key):
  """The split's base name must exist once the builder is prepared."""
  known = list(builder.info.splits.keys())
  if known:  # empty only for a builder without prepared metadata (e.g. tfds mock data)
    try:
      builder.info.splits[split]  # pylint: disable=pointless-statement
    except (KeyError, ValueError, AssertionError) as error:
      raise UserError(f'{key}={split!r} does not fit {builder.name}; splits: '
                      f'{", ".join(known)}') from error


def _features(builder):
  """(image key, label key) of an image classification data set."""
  features = builder.info.features
  image_keys = [key for key, feature in features.items()
                if isinstance(feature, tfds.features.Image)]
  label_keys = [key for key, feature in features.items()
                if isinstance(feature, tfds.features.ClassLabel)]
  label_key = 'label' if 'label' in label_keys else (label_keys[0] if label_keys else None)
  if not image_keys or label_key is None:
    raise UserError(f'tfds data set {builder.name!r} is not image classification (features: '
                    f'{", ".join(features.keys())}); need an Image and a ClassLabel feature')
  return image_keys[0], label_key


def _num_examples(builder, split):
  if builder.info.splits.keys():
    return builder.info.splits[split].num_examples
  return int(builder.as_dataset(split=split).cardinality())  # mock data: no split metadata


def _cached_table(stream, process_index, num_examples):
  """This process's shard of `stream` read into memory (pixels when all images share a size)."""
  image_shape = stream.builder.info.features[stream.image_key].shape
  fixed_size = all(dim is not None for dim in image_shape)
  images, labels = [], []
  for image, label in stream._shard(process_index, decode_images=fixed_size).as_numpy_iterator():  # pylint: disable=protected-access
    images.append(image)
    labels.append(label)
  labels = np.asarray(labels, np.int32)
  if fixed_size:
    pixels = np.stack(images)
    if pixels.shape[-1] == 1:
      pixels = np.repeat(pixels, 3, axis=-1)
    return table_lib.Table(labels=labels, pixels=pixels, local_shard=True,
                           global_num_examples=num_examples)
  encoded = np.empty((len(images),), object)
  encoded[:] = images
  return table_lib.Table(labels=labels, encoded=encoded, local_shard=True,
                         global_num_examples=num_examples)


def load(config, process_index, process_count):
  """Train and eval sources for this process from config.data (name, splits, data_dir, ...)."""
  data = config.data
  builder = _builder(data.name, data.data_dir)
  for key in ('train_split', 'eval_split'):
    _check_split_syntax(data[key], f'config.data.{key}')
  _prepare(builder, config)
  image_key, label_key = _features(builder)
  sources = [_source(builder, config, data[key], f'config.data.{key}', image_key, label_key,
                     process_index, process_count)
             for key in ('train_split', 'eval_split')]
  class_names = list(builder.info.features[label_key].names)
  return Loaded(train=sources[0], eval=sources[1], class_names=class_names)


def load_split(config, split, process_index, process_count):
  """The source of one more `split` of config.data's data set (for evaluators), like `load`'s."""
  builder = _builder(config.data.name, config.data.data_dir)
  _check_split_syntax(split, 'evals.splits')
  _prepare(builder, config)
  image_key, label_key = _features(builder)
  return _source(builder, config, split, 'evals.splits', image_key, label_key, process_index,
                 process_count)


def _source(builder, config, split, key, image_key, label_key, process_index, process_count):
  """A Stream of `split`, or this process's shard of it in memory with data.cache."""
  _check_split(builder, split, key)
  stream = Stream(builder=builder, split=split, image_key=image_key, label_key=label_key,
                  num_examples=_num_examples(builder, split),
                  shuffle_buffer=config.data.shuffle_buffer, process_count=process_count)
  if config.data.cache:
    return _cached_table(stream, process_index, stream.num_examples)
  return stream


def _check_split_syntax(split, key):
  """Rejects split strings tfds cannot parse, before anything is prepared."""
  try:
    tfds.core.ReadInstruction.from_spec(split)
  except (ValueError, AssertionError) as error:
    raise UserError(f'{key}={split!r} is not a tfds split string '
                    "(e.g. 'train', 'train[:98%]', 'test[:1000]')") from error
