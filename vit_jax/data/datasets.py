"""`create_datasets`: config -> train and eval batch iterators for one process.

The host delivers uint8 images at `host_image_size`; resizing to config.image_size,
normalisation and mixup/cutmix happen on the device (`vit_jax/data/device.py`).

Resumability: `train_batches(start_step)` is a pure function of (config.seed, start_step,
process_index, process_count). In-memory sources (digits, folders, tfds with data.cache) index
per-epoch permutations directly, so resuming costs nothing. Streamed tfds sets use a seeded,
deterministic tf.data pipeline and skip start_step * local_batch records on resume: the skipped
records are read but not decoded (roughly the time of one pass over that many files).
Augmentation randomness is seeded by (config.seed, the example's global stream position).
In-memory sources are fully permuted each epoch, so data.shuffle_buffer only sizes the streamed
tfds shuffle (the config refuses it elsewhere); digits are always in memory.
"""

import dataclasses
import functools
import itertools
from typing import Callable, Iterator, Optional, Union

import numpy as np
from vit_jax.data.tensorflow_import import tf

from vit_jax.data import augment
from vit_jax.data import digits
from vit_jax.data import folder
from vit_jax.data import naflex as naflex_lib
from vit_jax.data import table as table_lib
from vit_jax.data import tfds_source
from vit_jax.errors import UserError


Source = Union[table_lib.Table, tfds_source.Stream]


@dataclasses.dataclass
class Datasets:
  """Train and eval batches for one process, and what the model needs to know about them."""
  num_classes: int
  class_names: list
  num_train_examples: int    # the whole train split, over all processes
  num_eval_examples: int     # the whole eval split, over all processes
  host_image_size: int       # side of the uint8 images the host delivers
  num_skipped_files: int     # unreadable image files left out (folder source)
  seed: int
  aug: object                # config.aug
  global_batch_size: int
  local_batch_size: int
  local_eval_batch_size: int
  process_index: int
  process_count: int
  prefetch_batches: int
  train_source: Source
  eval_source: Source
  eval_crop_fraction: float
  # NaFlex (config.data.naflex_max_tokens): batches of patches at each image's own aspect ratio
  # (`vit_jax.data.naflex`) in place of 'images'; None: square images.
  naflex: Optional[naflex_lib.Spec] = None
  train_split: Optional[str] = None  # the names of the two splits above
  eval_split: Optional[str] = None
  # Any split of the same data set by name (for `split_batches`); None: only the two above.
  load_split: Optional[Callable[[str], Source]] = None
  _other_sources: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def image_size_on_host(self):
    """Alias of `host_image_size` (the name docs/ARCHITECTURE.md uses)."""
    return self.host_image_size

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    """Infinite {'images': uint8 (b, s, s, 3), 'labels': int32 (b,)} from `start_step` on.

    With NaFlex, the patches, positions, patch_mask and grid_hw of `vit_jax.data.naflex` in
    place of 'images'.

    Batch k of `train_batches(K)` equals batch K + k of `train_batches(0)`, augmentation
    included, for the same config and process layout.
    """
    if start_step < 0:
      raise UserError(f'start_step must be >= 0, got {start_step}')
    return self._train_iterator(start_step)

  def _train_iterator(self, start_step):
    """The generator behind `train_batches` (so a bad start_step fails at the call)."""
    if isinstance(self.train_source, table_lib.Table):
      examples = self._table_train_examples(start_step)
    else:
      examples = self.train_source.train_examples(
          self.seed, start_step, self.local_batch_size, self.global_batch_size,
          self.process_index)
    decode = self.train_source.decode

    def preprocess(payload, label, position):
      seed = tf.stack([tf.constant(self.seed % 2**63, tf.int64), position])
      image = augment.to_rgb(decode(payload))
      if self.naflex:
        return naflex_lib.train_preprocess(image, seed, self.aug, self.naflex), label
      image = augment.train_preprocess(image, seed, self.aug, self.host_image_size)
      return image, label

    dataset = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(self.local_batch_size, drop_remainder=True)
    if self.prefetch_batches:  # 0: nothing in flight, anywhere.
      dataset = dataset.prefetch(self.prefetch_batches)
    for inputs, labels in self._read(dataset, self.train_source):
      yield {**_named_inputs(inputs), 'labels': labels.astype(np.int32)}

  @staticmethod
  def _read(dataset, source):
    """Iterates `dataset`; a tfds shard that fails to read is one line naming it."""
    try:
      yield from dataset.as_numpy_iterator()
    except tf.errors.OpError as e:
      if not isinstance(source, tfds_source.Stream):
        raise
      raise source.read_fault(e) from None

  def _table_train_examples(self, start_step):
    """tf.data of (payload, label, global position) for an in-memory train split."""
    source = self.train_source
    index = table_lib.StreamIndex(
        len(source), self.seed, self.global_batch_size, self.process_index,
        self.process_count, shared=not source.local_shard)

    def batches():
      for step in itertools.count(start_step):
        rows = index.rows(step)
        payloads, labels = source.rows(rows, keep_count=True)
        yield payloads, labels, index.global_positions(step)

    signature = (source.payload_spec(), tf.TensorSpec((None,), tf.int32),
                 tf.TensorSpec((None,), tf.int64))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).unbatch()

  def eval_batches(self) -> Iterator[dict]:
    """One pass over this process's eval shard, padded to full batches.

    Yields {'images': uint8 (b, s, s, 3), 'labels': int32 (b,), 'mask': float32 (b,)}; mask is
    0 on padding. Every process yields the same number of batches. With NaFlex, the patch keys
    in place of 'images' (a padding example has no real patch).
    """
    return self._padded_batches(self.eval_source)

  def split_batches(self, split, max_examples=None) -> Iterator[dict]:
    """One pass over any `split` of the data set, made as `eval_batches` makes the eval split's
    (un-augmented, padded, with 'mask'); for evaluators that read other splits.

    `max_examples`: at most that many examples of the split, over all processes: a fixed random
    subset of an in-memory split (the same for every run), the first records of a streamed tfds
    split (tfds shuffles a split's records when it prepares it). A split that does not exist
    is a UserError here, at the call, before any batch is read.
    """
    if max_examples is not None and max_examples < 1:
      raise UserError(f'max_examples={max_examples} must be positive')
    return self._padded_batches(self._source_of(split), max_examples)

  def _source_of(self, split):
    if split == self.train_split:
      return self.train_source
    if split == self.eval_split:
      return self.eval_source
    if split not in self._other_sources:
      if self.load_split is None:
        raise UserError(f'split {split!r}: these Datasets read only the splits '
                        f'{self.train_split!r} and {self.eval_split!r}')
      self._other_sources[split] = self.load_split(split)
    return self._other_sources[split]

  def _padded_batches(self, source, max_examples=None):
    """The generator behind `eval_batches` and `split_batches`."""
    batch = self.local_eval_batch_size

    def preprocess(payload, label):
      image = augment.to_rgb(source.decode(payload))
      if self.naflex:
        return naflex_lib.eval_preprocess(image, self.naflex, self.eval_crop_fraction), label
      return augment.eval_preprocess(image, self.host_image_size, self.eval_crop_fraction), label

    if isinstance(source, table_lib.Table):
      rows, num_batches = table_lib.eval_rows(
          source, batch, self.process_index, self.process_count, max_examples)
      dataset = tf.data.Dataset.from_generator(
          lambda: (source.rows(rows[i:i + batch], keep_count=False)
                   for i in range(0, len(rows), batch)),
          output_signature=(source.payload_spec(), tf.TensorSpec((None,), tf.int32)))
      dataset = dataset.unbatch()
    else:
      dataset = source.eval_examples(self.process_index, self.process_count)
      num_batches = source.num_eval_batches(batch, self.process_count, max_examples)
      if max_examples is not None:
        dataset = dataset.take(-(-max_examples // self.process_count))
    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch)
    if self.prefetch_batches:
      dataset = dataset.prefetch(self.prefetch_batches)

    def padded():
      size = self.host_image_size
      yielded = 0
      for inputs, labels in self._read(dataset, source):
        if yielded == num_batches:
          break
        yield _pad_batch(inputs, labels, batch)
        yielded += 1
      while yielded < num_batches:
        empty = (naflex_lib.empty_inputs(self.naflex, 0) if self.naflex
                 else np.zeros((0, size, size, 3), np.uint8))
        yield _pad_batch(empty, np.zeros((0,), np.int32), batch)
        yielded += 1

    return padded()


def _named_inputs(inputs):
  """A batch's model inputs by name: {'images': ...}, or the NaFlex dict as it is."""
  return inputs if isinstance(inputs, dict) else {'images': inputs}


def _pad_batch(inputs, labels, batch):
  """Pads (n <= batch) examples to a full batch, with mask 1 on the real ones."""
  count = len(labels)
  mask = np.zeros((batch,), np.float32)
  mask[:count] = 1.0
  padded = {}
  for key, value in _named_inputs(inputs).items():
    padded[key] = np.zeros((batch,) + value.shape[1:], value.dtype)
    padded[key][:count] = value
  padded_labels = np.zeros((batch,), np.int32)
  padded_labels[:count] = labels
  return {**padded, 'labels': padded_labels, 'mask': mask}


def create_datasets(config, process_index: int = 0, process_count: int = 1) -> Datasets:
  """Builds this process's train and eval pipelines from config.data and config.aug.

  Args:
    config: the resolved run config (`vit_jax.train.config.resolve`: every value checked,
      eval_batch_size and data.host_image_size filled in).
    process_index: this process (jax.process_index()).
    process_count: all processes (jax.process_count()); each reads only its own shard.

  Returns:
    Datasets; local train batch = batch_size // process_count, local eval batch =
    eval_batch_size // process_count.

  Raises:
    UserError: a data folder or a tfds name/split that cannot work.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f'process_index={process_index} is not in [0, process_count={process_count})')
  data = config.data
  num_skipped_files = 0
  if data.source == 'digits':
    train_source, eval_source = digits.load(data.train_split), digits.load(data.eval_split)
    class_names = list(digits.CLASS_NAMES)
  elif data.source == 'folder':
    loaded = folder.load(data.name, data.train_split, data.eval_split, cache=data.cache)
    train_source, eval_source = loaded.train, loaded.eval
    class_names = loaded.class_names
    num_skipped_files = loaded.num_skipped_files
  else:
    loaded = tfds_source.load(config, process_index, process_count)
    train_source, eval_source = loaded.train, loaded.eval
    class_names = loaded.class_names

  global_batch = config.batch_size
  return Datasets(
      num_classes=len(class_names),
      class_names=list(class_names),
      num_train_examples=_num_examples(train_source),
      num_eval_examples=_num_examples(eval_source),
      host_image_size=data.host_image_size,
      num_skipped_files=num_skipped_files,
      seed=config.seed,
      aug=config.aug,
      global_batch_size=global_batch,
      local_batch_size=global_batch // process_count,
      local_eval_batch_size=config.eval_batch_size // process_count,
      process_index=process_index,
      process_count=process_count,
      prefetch_batches=data.prefetch_batches,
      train_source=train_source,
      eval_source=eval_source,
      eval_crop_fraction=config.aug.eval_crop_fraction,
      naflex=(naflex_lib.Spec(tuple(config.model_fields.patch_size), data.naflex_max_tokens)
              if data.naflex_max_tokens else None),
      train_split=data.train_split,
      eval_split=data.eval_split,
      load_split=functools.partial(_load_split, config, list(class_names), process_index,
                                   process_count),
  )


def _load_split(config, class_names, process_index, process_count, split):
  """The source of another split of config.data's data set (class names: the train split's)."""
  data = config.data
  if data.source == 'digits':
    return digits.load(split)
  if data.source == 'folder':
    return folder.load_split(data.name, split, class_names, cache=data.cache)
  return tfds_source.load_split(config, split, process_index, process_count)


def _num_examples(source):
  """Examples in the whole split, over all processes."""
  if isinstance(source, table_lib.Table):
    return source.global_num_examples or len(source)
  return source.num_examples
